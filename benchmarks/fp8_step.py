"""FP8 training against bf16: step time and the loss curve of each precision on the same model, data and seed.

One process; each precision trains ``--steps`` steps from the same initialisation on the same batches of the
shipped demo text (learnable, unlike the synthetic data, so the losses say something).
Prints step time (median after warm-up) as a ratio to bf16, and the final losses (mean of the last 10 steps)
beside bf16's. Every precision asked for (--only) must run: one that fails is recorded with its error and the exit
status is 1. Without --only, the rows are those benchmarks/preflight.py allows here (``--plan``: its saved
verdict); the rows it rules out (no TE, no Hopper GPU) are listed as skipped with its reason, not attempted.

    python benchmarks/fp8_step.py                                      # CPU: bf16 vs native (emulated GEMMs)
    python benchmarks/fp8_step.py --size proxy_1gpu --batch 2 --seq 4096 --plan OUT/preflight.json   # one GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import report  # noqa: E402

PRECISIONS = {
    "bf16": ["precision=bf16"],
    "fp8 te blockwise": ["precision=fp8", "precision.fp8.provider=te", "precision.fp8.recipe=blockwise"],
    "fp8 te current": ["precision=fp8", "precision.fp8.provider=te", "precision.fp8.recipe=current"],
    "fp8 native blockwise": ["precision=fp8", "precision.fp8.provider=native", "precision.fp8.recipe=blockwise"],
}


def train(overrides: list[str], steps: int) -> tuple[list[float], list[float]]:
    """(step seconds, losses) of ``steps`` steps of a fresh Trainer."""
    from moetrain.config import compose, to_job_config
    from moetrain.train import Trainer

    job = to_job_config(compose([f"run.dir={tempfile.mkdtemp()}", "logging.console=false", "logging.jsonl=false",
                                 "train.val_interval=0", "optim.warmup_steps=5", "checkpoint.interval=0",
                                 *overrides]))
    trainer = Trainer(job)
    cuda = trainer.device.type == "cuda"
    times, losses = [], []
    try:
        for _ in range(steps):
            trainer.step += 1
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            losses.append(trainer.train_step()["loss"])
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    finally:
        trainer.close()
    return times, losses


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="tiny", help="model preset (conf/model), e.g. tiny or proxy")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--only", nargs="*", default=None, choices=list(PRECISIONS), help="precisions to run")
    p.add_argument("--plan", default=None, help="benchmarks/preflight.py's JSON: run its fp8_run, skip its fp8_skipped")
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*", help="further config overrides for every row, e.g. data.demo_bytes=200000")
    args = p.parse_args()
    skipped = {}
    if args.plan:
        with open(args.plan) as f:
            plan = json.load(f)
        args.only, skipped = plan["fp8_run"], plan["fp8_skipped"]
    elif args.only is None:
        from preflight import fp8_rows

        args.only, skipped = fp8_rows("cuda" if torch.cuda.is_available() else "cpu")

    common = [f"model={args.size}", "data=demo", f"train.seq_len={args.seq}", f"model.max_seq_len={max(args.seq, 256)}",
              f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
              f"train.steps={args.steps}", *args.overrides]
    rows, base, failed = [], None, []
    for name in args.only:
        try:
            times, losses = train(common + PRECISIONS[name], args.steps)
        except Exception as e:  # recorded, the other rows still run, and the exit status says it failed
            traceback.print_exc()
            rows.append({"precision": name, "failed": f"{type(e).__name__}: {e}"[:400]})
            failed.append(name)
            continue
        finally:  # NOTE: the last Trainer's reference cycles would hold its GPU memory into the next row's
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        step = statistics.median(times[3:] or times)
        final = sum(losses[-10:]) / len(losses[-10:])
        if base is None:
            base = (step, final)
        rows.append({"precision": name, "step_ms": 1e3 * step, "x_first": step / base[0],
                     "tokens_per_s": args.batch * args.seq / step, "final_loss": final,
                     "loss_vs_first": final - base[1], "loss_at_10": losses[min(9, len(losses) - 1)]})
    rows += [{"precision": name, "skipped": reason} for name, reason in skipped.items()]
    rows.append({"size": args.size, "batch": args.batch, "seq": args.seq, "steps": args.steps,
                 "first": args.only[0] if args.only else None, "failed": failed})
    report(rows, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
