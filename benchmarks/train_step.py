"""Training-step throughput: moetrain's Trainer against a plain loop over transformers' DeepseekV3ForCausalLM.

Same model config (no MTP, no balance loss: transformers has neither), AdamW settings, gradient clipping and
batch; one process, alternating rounds so that machine noise hits both alike.

    python benchmarks/train_step.py                                      # CPU-sized model, fp32
    python benchmarks/train_step.py --size proxy --batch 4 --seq 4096    # on a GPU (bf16)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import bench_hf_config, report  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="cpu", choices=["cpu", "proxy"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from transformers import DeepseekV3ForCausalLM

    from moetrain.config import compose, to_job_config
    from moetrain.hf import config_from_hf
    from moetrain.train import Trainer

    cuda = torch.cuda.is_available()
    hf_cfg = bench_hf_config(args.size, "cuda" if cuda else "cpu")
    run_dir = tempfile.mkdtemp()
    job = to_job_config(compose([
        "data=synthetic", f"run.dir={run_dir}", "logging.console=false", "logging.jsonl=false",
        f"train.seq_len={args.seq}", f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
        f"train.compile={str(args.compile).lower()}", "train.val_interval=0", "optim.warmup_steps=0",
        "model.max_seq_len=8192"]))
    job.model = config_from_hf(hf_cfg.to_dict())
    job.model.n_mtp_layers, job.model.moe.router.balance_loss_alpha = 0, 0.0
    job.model.max_seq_len = max(job.model.max_seq_len, args.seq)
    ours = Trainer(job)

    torch.manual_seed(0)
    device = ours.device
    hf = DeepseekV3ForCausalLM(hf_cfg).to(device).train()
    o = job.optim
    opt = torch.optim.AdamW(hf.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    tokens = torch.randint(0, hf_cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    dtype = ours.precision.compute_dtype

    def hf_step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = hf(tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def run(fn, n):
        fn()  # warm-up
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    def ours_step():
        ours.step += 1
        ours.train_step()

    t_hf = t_ours = float("inf")
    for _ in range(args.rounds):
        t_hf = min(t_hf, run(hf_step, args.steps))
        t_ours = min(t_ours, run(ours_step, args.steps))
    n = args.batch * args.seq
    tflops_ours = ours.flops_per_token * n / t_ours / 1e12
    report([{"impl": "transformers loop", "experts": hf.config._experts_implementation, "tokens_per_s": n / t_hf},
            {"impl": "moetrain Trainer", "tokens_per_s": n / t_ours, "tflops": tflops_ours,
             "mfu": tflops_ours / ours.peak if ours.peak else "n/a"},
            {"speedup": t_hf / t_ours, "size": args.size, "dtype": str(dtype), "batch": args.batch, "seq": args.seq,
             "compile": args.compile}], args.json)


if __name__ == "__main__":
    main()
