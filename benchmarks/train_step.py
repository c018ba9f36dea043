"""Training-step throughput: moetrain's Trainer against a plain loop over transformers' DeepseekV3ForCausalLM.

Both train the same shape: a moetrain model preset (conf/model), whose DeepseekV3Config comes from
``moetrain.hf.config_to_hf``, without MTP and without the balance loss (transformers has neither); the same
AdamW (``moetrain.optim.build_optimizer``), gradient clipping, batch shape and compute dtype. Each runs in its own
process (``--impl both``, the default, starts the two one after the other), so that never both models, their
gradients and Adam states share one GPU. Reported per implementation: tokens/s, model TFLOP/s (moetrain's FLOP
count of this shape, the same for both), peak memory, and the host syncs of one step (moetrain.host_syncs; on
CUDA also the synchronising calls torch.cuda.set_sync_debug_mode reports).

NOTE: both keep fp32 master weights under bf16 autocast (moetrain's recipe). transformers' grouped_mm experts are
not autocast-enabled: they cast their input to the weights' dtype, so its routed experts then multiply in fp32
(its integrations/moe.py says so); moetrain casts to bf16. The row names the experts implementation.

    python benchmarks/train_step.py                                                  # model=tiny on CPU
    python benchmarks/train_step.py --model proxy_1gpu --batch 2 --seq 4096 --json out.json   # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

IMPLS = {"moetrain": "moetrain Trainer", "hf": "transformers loop"}


def job_config(args, run_dir: str):
    from moetrain.config import compose, to_job_config

    return to_job_config(compose([
        f"model={args.model}", "data=synthetic", f"run.dir={run_dir}", "logging.console=false",
        "logging.jsonl=false", f"train.seq_len={args.seq}", f"train.global_batch_size={args.batch}",
        f"train.micro_batch_size={args.batch}", f"train.compile={str(args.compile).lower()}", "train.val_interval=0",
        "optim.warmup_steps=0", "checkpoint.interval=0", "model.n_mtp_layers=0",
        "model.moe.router.balance_loss_alpha=0"]))


def moetrain_step(job):
    """(step function, Trainer) of moetrain."""
    from moetrain.train import Trainer

    trainer = Trainer(job)

    def step() -> float:
        trainer.step += 1
        return trainer.train_step()["loss"]

    return step, trainer


def hf_step(job, device):
    """(step function, model) of a plain transformers loop of the same shape, optimizer and clipping."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from moetrain.hf import config_to_hf
    from moetrain.optim import build_optimizer
    from moetrain.precision import Precision

    cfg = DeepseekV3Config.from_dict(config_to_hf(job.model))
    torch.manual_seed(job.train.seed)
    with torch.device(device):  # NOTE: initialised where it trains: a CPU init of a GPU-sized model takes minutes
        model = DeepseekV3ForCausalLM(cfg).train()
    opt = build_optimizer(model, job.optim)
    dtype = Precision(job.precision, device).compute_dtype
    b, t, o = job.train.micro_batch_size, job.train.seq_len, job.optim

    def step():
        tokens = torch.randint(0, cfg.vocab_size, (b, t), device=device)  # as data=synthetic: uniform tokens
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, model


def timed_rounds(step, steps: int, rounds: int, cuda: bool) -> tuple[float, float]:
    """(best mean seconds per step over the rounds, last loss), after one warm-up step."""
    import torch

    step()
    best, loss = float("inf"), None
    for _ in range(rounds):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best, float(loss)


def count_syncs(step, steps: int, cuda: bool) -> dict:
    """Host syncs per step, counted on steps that are not timed (the counting itself costs time)."""
    import torch

    from moetrain.host_syncs import HostSyncCounter

    counted = {}
    with HostSyncCounter() as syncs:
        for _ in range(steps):
            step()
    counted["host_syncs_per_step"] = syncs.total / steps
    counted["host_syncs_by_op"] = dict(syncs.by_op)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(steps):
                    step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        found = [w for w in caught if "synchronizing" in str(w.message)]
        counted["cuda_syncs_per_step"] = len(found) / steps
    return counted


def run_one(args) -> dict:
    import torch

    from moetrain.plan import peak_tflops, training_flops_per_token

    with tempfile.TemporaryDirectory() as run_dir:
        job = job_config(args, run_dir)
        if args.impl == "moetrain":
            step, trainer = moetrain_step(job)
            device = trainer.device
        else:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            step, trainer = hf_step(job, device)
        cuda = device.type == "cuda"
        seconds, loss = timed_rounds(step, args.steps, args.rounds, cuda)
        syncs = count_syncs(step, args.sync_steps, cuda)
        extra = {"experts": trainer.config._experts_implementation} if args.impl == "hf" else {}
        if args.impl == "moetrain":
            trainer.close()
    tokens = args.batch * args.seq
    tflops = training_flops_per_token(job.model, args.seq) * tokens / seconds / 1e12
    peak = peak_tflops(torch.cuda.get_device_name() if cuda else "cpu")
    from common import machine

    return {"impl": IMPLS[args.impl], "machine": machine(), "tokens_per_s": tokens / seconds, "tflops": tflops,
            "mfu": tflops / peak if peak else None, "step_ms": 1e3 * seconds, "loss": loss,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
            **extra, **syncs}


def run_both(args) -> int:
    """Each implementation in a child process; the rows side by side. Non-zero if either failed."""
    argv = ["--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
            "--rounds", str(args.rounds), "--sync-steps", str(args.sync_steps)]
    argv += ["--compile"] if args.compile else []
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for impl in IMPLS:
            path = os.path.join(tmp, f"{impl}.json")
            print(f"-- {IMPLS[impl]} (own process)", flush=True)
            done = subprocess.run([sys.executable, __file__, *argv, "--impl", impl, "--json", path])
            if done.returncode != 0 or not os.path.exists(path):
                failed.append(f"{impl} (exit {done.returncode})")
                continue
            with open(path) as f:
                rows.append(json.load(f)["rows"][0])
    side = {"model": args.model, "batch": args.batch, "seq": args.seq, "steps": args.steps, "rounds": args.rounds,
            "compile": args.compile, "failed": failed}
    if len(rows) == 2:
        side["speedup"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    print(f"{'':20s}{'tokens/s':>12s}{'TFLOP/s':>10s}{'MFU':>8s}{'peak GB':>9s}{'host syncs/step':>17s}")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "n/a"
        mem = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] else "n/a"
        print(f"{r['impl']:20s}{r['tokens_per_s']:12.1f}{r['tflops']:10.4g}{mfu:>8s}{mem:>9s}"
              f"{r['host_syncs_per_step']:17g}")
    print("  ".join(f"{k}={v}" for k, v in side.items()))
    if args.json:  # NOTE: this parent never imports torch (the children hold the machine's details)
        with open(args.json, "w") as f:
            json.dump({"rows": [*rows, side]}, f, indent=2)
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", default="both", choices=["both", *IMPLS])
    p.add_argument("--model", default="tiny", help="model preset (conf/model), e.g. tiny or proxy_1gpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sync-steps", type=int, default=1, help="further steps whose host syncs are counted")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args.impl == "both":
        return run_both(args)
    from common import report

    report([run_one(args)], args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
