"""Write the golden loss traces of tests/test_loss_trace.py and measure the spread that sets their tolerance.

    python tests/assets/losses/regenerate.py            # every layout under each CPU kernel set x 1, 2 threads

Each layout trains the same 30 steps on the same global batches; its trace is the run with DEFAULT kernels and one
thread per rank. The other runs (this CPU's vectorised kernels, two threads) measure how far a correct run moves
by summation order alone; ``tolerance.json`` keeps that spread and the bound derived from it. Regenerate only when
a change is meant to change the numbers, and say why in the commit.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/: layouts.py

from layouts import cpu_capabilities, train_layout  # noqa: E402

STEPS = 30
# The run of tests/layouts.py at a quarter of its tokens per step (the traces cost seconds in CI), 30 steps, a short
# warmup so that the trace covers real learning, no checkpoints beyond the last.
OVERRIDES = [f"train.steps={STEPS}", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2",
             "optim.warmup_steps=5", "checkpoint.interval=0"]
LAYOUTS = {  # name: (ranks, overrides)
    "single_fp32": (1, []),
    "ep2_dp2": (4, ["parallel.ep=2"]),
    "pp2_1f1b": (2, ["parallel.pp=2", "parallel.pp_schedule=1F1B"]),
}
KEYS = ("loss", "grad_norm")
# The bound: the largest relative move measured across kernels and threads, times this margin for CPUs not measured
# here (AVX-512's reductions, other core counts), and never tighter than fp32 layouts' own 1e-5.
MARGIN, FLOOR = 10.0, 1e-5


def trace(records: list[dict]) -> dict:
    return {"steps": [r["step"] for r in records], **{k: [r[k] for r in records] for k in KEYS}}


def relative_spread(a: dict, b: dict) -> float:
    return max(abs(x - y) / max(1.0, abs(y)) for k in KEYS for x, y in zip(a[k], b[k]))


def _write(path: Path, record: dict) -> None:
    """One key per line, each value on its line: diffs of a regenerated trace stay readable."""
    path.write_text("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items()) + "\n}\n")


def main() -> None:
    variants = [(cap, threads) for cap in cpu_capabilities() for threads in ("1", "2")]
    spreads = {}
    for name, (nproc, extra) in LAYOUTS.items():
        runs = {}
        for cap, threads in variants:
            env = {**os.environ, "ATEN_CPU_CAPABILITY": cap, "OMP_NUM_THREADS": threads, "WANDB_MODE": "disabled"}
            with tempfile.TemporaryDirectory() as tmp:
                runs[(cap, threads)] = trace(train_layout(Path(tmp) / "run", nproc, *OVERRIDES, *extra, env=env))
            print(name, cap, threads, runs[(cap, threads)]["loss"][-1], flush=True)
        golden = runs[("default", "1")]
        spreads[name] = max(relative_spread(t, golden) for t in runs.values())
        _write(HERE / f"{name}.json", {"ranks": nproc, "overrides": OVERRIDES + extra, **golden})
    worst = max(spreads.values())
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    _write(HERE / "tolerance.json", {
        "measured_on": f"{date.today()}, {cpu}, torch {torch.__version__}",
        "measured_with": {"kernels": cpu_capabilities(), "threads_per_rank": [1, 2]},
        "spread_per_layout": spreads, "margin": MARGIN, "floor": FLOOR,
        "relative_tolerance": max(FLOOR, MARGIN * worst)})
    print(json.dumps(spreads), "tolerance", max(FLOOR, MARGIN * worst))


if __name__ == "__main__":
    main()
