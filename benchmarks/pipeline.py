"""Pipeline parallelism: step time and measured bubble of every schedule at pp = 2 and 4, beside a pp = 1 peer.

Each configuration is a real training run (``python -m torch.distributed.run --standalone --nproc-per-node pp
-m moetrain train ...``, one process per pipeline rank, dp = 1) of the same model and global batch: the tiny
model with ``--layers`` blocks (enough for 2 * pp stages at pp = 4), ``--micro-batches`` micro-batches of
``--micro-batch-size`` sequences per step. The peer is the same run at pp = 1 (the same micro-batches as
gradient accumulation in one process). ``--rounds`` repeats every configuration; a peer run opens each round
and closes the last, so that drift of a shared machine hits the peer as it hits the rest.

Per configuration, from run.dir/metrics.jsonl (logging.interval=1) over the steps after the first ``--skip`` of
every round:
  step ms      mean of the trainer's step time (tokens per step / tokens_per_s), with its range over those steps;
               "x pp1" is its ratio to the peer's mean, the number to read
  bubble/rank  mean of ``pipeline_bubble_per_rank`` (1 - a rank's forward/backward compute time / the schedule
               step's wall time)
and from the trainer's last log line (``pipeline: ... measured bubble per rank ...``, in run.dir/train.log: every
step but the schedule's first; mean over rounds), beside ``ScheduleSpec.bubble_formula`` (equal stage times, no
communication; none for DualPipeV).

    python benchmarks/pipeline.py                                   # CPU, gloo, OMP_NUM_THREADS=1 per rank
    python benchmarks/pipeline.py --pp 2 --schedules 1F1B DualPipeV --steps 6
    python benchmarks/pipeline.py --rounds 1 model.dim=128          # extra moetrain overrides for every run
    python benchmarks/pipeline.py --device cuda                     # nccl; needs pp GPUs on the node (untested)

On CPU every rank is one process with one thread: pp = 4 on a 2-core machine is oversubscribed (4 processes on
2 cores), so its step times and bubbles include time a rank waits for a core. Read ratios, not absolute times.
The defaults take about 4 minutes on 2 cores. On Linux each run also reports the CPU time other processes spent
meanwhile (from /proc/stat less this benchmark's own): anything well above 0 means a shared machine skewed it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import machine  # noqa: E402

SCHEDULES = ["GPipe", "1F1B", "Interleaved1F1B", "ZBVZeroBubble", "DualPipeV"]
_FINAL = re.compile(r"pipeline: (\S+), pp (\d+), (\d+) micro-batches: measured bubble per rank ([\d., ]+?) "
                    r"\(schedule's formula: (.*)\)$")


def _cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds the whole machine has spent busy, those of this process and its finished children) on Linux:
    their difference grows with what other processes run beside the benchmark."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    own = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
              for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return busy / os.sysconf("SC_CLK_TCK"), own


def _others(start: tuple[float, float] | None) -> float | None:
    """CPU seconds spent by other processes since ``start`` (a _cpu_seconds())."""
    end = _cpu_seconds()
    if start is None or end is None:
        return None
    return max((end[0] - start[0]) - (end[1] - start[1]), 0.0)


def _run(args, run_dir: Path, pp: int, schedule: str | None) -> dict:
    """One torchrun training run: its per-step times and bubbles and final log line, or its error (command and
    output tail)."""
    overrides = [f"run.dir={run_dir}", f"train.steps={args.steps}", "logging.interval=1", "logging.console=false",
                 f"data.demo_bytes={args.demo_bytes}", f"train.seq_len={args.seq}", "train.val_interval=0",
                 "checkpoint.interval=0", f"model.n_layers={args.layers}",
                 f"train.global_batch_size={args.micro_batches * args.micro_batch_size}",
                 f"train.micro_batch_size={args.micro_batch_size}", f"train.device={args.device}",
                 f"parallel.pp={pp}"]
    if schedule:
        overrides.append(f"parallel.pp_schedule={schedule}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(pp),
           "-m", "moetrain", "train", *overrides, *args.override]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = f"timeout after {args.timeout} s"
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
    run = {"wall_s": time.perf_counter() - t0, "others_cpu_s": _others(cpu0), "command": " ".join(cmd)}
    tail = _tail(out)
    if rc != 0:
        return {**run, "error": f"exit {rc}", "output_tail": tail}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    kept = [r for r in records if r["step"] > args.skip]
    if not kept:
        return {**run, "error": f"no step after --skip {args.skip} in metrics.jsonl", "output_tail": tail}
    run["step_ms"] = [1e3 * r["global_batch"] * args.seq / r["tokens_per_s"] for r in kept]
    if pp == 1:
        return run
    run["bubble_per_rank"] = [r["pipeline_bubble_per_rank"] for r in kept]
    log = (run_dir / "train.log").read_text()
    final = [m for m in map(_FINAL.match, log.splitlines()) if m]
    if not final:
        return {**run, "error": "no final 'pipeline: ... measured bubble per rank' line in train.log",
                "output_tail": "\n".join(log.splitlines()[-10:])}
    m, layout = final[-1], re.search(r"stages of blocks (\[.*?\]\])\)", log)
    run.update(log_line=m.group(0), layout=layout.group(1) if layout else "?", micro_batches=int(m.group(3)),
               log_bubble_per_rank=[float(x) for x in m.group(4).split(",")], log_formula=m.group(5))
    return run


def _tail(out: str, n: int = 25) -> str:
    """The last n lines of a run's output before torchrun's own failure report (which names no cause)."""
    lines = out.splitlines()
    end = next((i for i, line in enumerate(lines) if "failed (exitcode:" in line), len(lines) - 1)
    return "\n".join(lines[max(0, end - n + 1):end + 1])


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def _merge(runs: list[dict], name: str, pp: int, args) -> dict:
    """One row: a configuration's runs (one per round) pooled."""
    row = {"schedule": name, "pp": pp, "m": args.micro_batches, "runs": runs}
    ok = [r for r in runs if "error" not in r]
    if len(ok) < len(runs):
        row["error"] = "; ".join(r["error"] for r in runs if "error" in r)
    if not ok:
        return row
    ms = [t for r in ok for t in r["step_ms"]]
    row.update(step_ms=_mean(ms), step_ms_min=min(ms), step_ms_max=max(ms), steps=len(ms))
    if pp > 1:
        row["bubble_per_rank"] = [_mean(col) for col in zip(*[b for r in ok for b in r["bubble_per_rank"]])]
        row["log_bubble_per_rank"] = [_mean(col) for col in zip(*[r["log_bubble_per_rank"] for r in ok])]
        row["log_lines"] = [r["log_line"] for r in ok]
        row["layout"] = ok[0]["layout"]
        value, formula = _formula(name, pp, args.micro_batches)
        row.update(formula=formula, formula_value=value,
                   log_formula_agrees=all(_log_formula_agrees(r["log_formula"], value) for r in ok))
    return row


def _formula(schedule: str, pp: int, m: int) -> tuple[float | None, str]:
    from moetrain.parallel.pipeline_layout import chunks_per_rank, schedule_spec

    spec = schedule_spec(schedule)
    return spec.bubble_formula(pp, m, chunks_per_rank(spec, 0))


def _log_formula_agrees(logged: str, value: float | None) -> bool:
    """Whether the formula value in the trainer's log line is the one computed here."""
    m = re.search(r"= ([\d.]+)$", logged)
    if value is None or m is None:
        return value is None and m is None
    return abs(float(m.group(1)) - value) < 5e-4


def _fmt_ranks(values) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def _table(rows: list[dict], peer_ms: float | None) -> list[str]:
    head = ["schedule", "pp", "m", "step ms (min-max)", "x pp1", "bubble/rank per step (mean)", "bubble/rank log line",
            "formula"]
    body = []
    for r in rows:
        if "step_ms" not in r:
            body.append([r["schedule"], str(r["pp"]), str(r["m"]), "FAILED", "", r["error"], "", ""])
            continue
        cells = [r["schedule"], str(r["pp"]), str(r["m"]),
                 f"{r['step_ms']:.0f} ({r['step_ms_min']:.0f}-{r['step_ms_max']:.0f})",
                 f"{r['step_ms'] / peer_ms:.2f}" if peer_ms else ""]
        if r["pp"] > 1:
            b, v = r["bubble_per_rank"], r["formula_value"]
            cells += [f"{_fmt_ranks(b)} ({_mean(b):.3f})", _fmt_ranks(r["log_bubble_per_rank"]),
                      f"{v:.3f}" if v is not None else "n/a"]
        if "error" in r:
            cells[0] += " (some runs FAILED)"
        body.append(cells + [""] * (len(head) - len(cells)))
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head] + body]


def _progress(name: str, run: dict) -> None:
    status = f"{_mean(run['step_ms']):.1f} ms/step" if "step_ms" in run else "FAILED"
    if "error" in run:
        status += f" ({run['error']})"
    others = run["others_cpu_s"]
    others = f", other processes used {others:.1f} CPU-s meanwhile" if others is not None else ""
    print(f"# {name}: {status}, run took {run['wall_s']:.1f} s{others}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--schedules", nargs="+", default=SCHEDULES, choices=SCHEDULES)
    p.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    p.add_argument("--layers", type=int, default=8, help="model.n_layers: at least 2 * max(pp) for V-shapes")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--micro-batches", type=int, default=8, help="per step (dp = 1); DualPipeV needs >= 2 * pp")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--skip", type=int, default=2, help="leading steps of each run left out of the means")
    p.add_argument("--rounds", type=int, default=2, help="runs of every configuration, interleaved")
    p.add_argument("--demo-bytes", type=int, default=200_000)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every rank")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: nccl, needs pp GPUs")
    p.add_argument("--timeout", type=int, default=600, help="seconds per run")
    p.add_argument("--keep", default=None, help="keep the run directories under this folder")
    p.add_argument("--json", default=None)
    p.add_argument("override", nargs="*", help="extra moetrain overrides for every run, e.g. model.dim=128")
    args = p.parse_args()

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="moetrain-pipeline-"))
    root.mkdir(parents=True, exist_ok=True)
    configs = [(pp, s) for pp in args.pp for s in args.schedules]
    load0, t_start, cpu0 = os.getloadavg(), time.perf_counter(), _cpu_seconds()
    runs: dict[tuple[int, str], list[dict]] = {}
    peers: list[dict] = []
    try:
        for rnd in range(args.rounds + 1):  # a peer opens every round and closes the last
            peers.append(_run(args, root / f"r{rnd}-pp1", 1, None))
            _progress(f"round {rnd} pp1 peer", peers[-1])
            if rnd == args.rounds:
                break
            for pp, schedule in configs:
                run = _run(args, root / f"r{rnd}-pp{pp}-{schedule}", pp, schedule)
                runs.setdefault((pp, schedule), []).append(run)
                _progress(f"round {rnd} pp{pp} {schedule}", run)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    load1, others = os.getloadavg(), _others(cpu0)
    rows = [_merge(peers, "pp=1 peer", 1, args)] + [_merge(rs, s, pp, args) for (pp, s), rs in runs.items()]
    peer_ms = rows[0].get("step_ms")

    print()
    print(f"model: tiny, {args.layers} layers, seq {args.seq}, {args.micro_batches} micro-batches of "
          f"{args.micro_batch_size} sequences per step (dp 1), {args.steps} steps per run, {args.rounds} round(s); "
          f"means over steps {args.skip + 1}..{args.steps} of every run; extra overrides: "
          f"{' '.join(args.override) or 'none'}")
    print(f"device {args.device} ({'gloo' if args.device == 'cpu' else 'nccl'}), OMP_NUM_THREADS={args.threads} per "
          f"rank; machine {machine()}, {os.cpu_count()} CPU cores; load average {load0[0]:.2f} at the start, "
          f"{load1[0]:.2f} at the end")
    print(f"x pp1: step time over the pp=1 peer's mean ({peer_ms:.1f} ms, {len(peers)} runs: "
          + ", ".join(f"{_mean(r['step_ms']):.0f}" for r in peers if "step_ms" in r) + " ms)"
          if peer_ms else "x pp1: the peer did not run")
    print()
    for line in _table(rows, peer_ms):
        print(line)
    print()
    for s in args.schedules:
        print(f"formula {s}: {_formula(s, args.pp[0], args.micro_batches)[1]}")
    for r in rows[1:]:
        if "layout" in r:
            print(f"layout {r['schedule']} pp {r['pp']}: stages of blocks {r['layout']} (first-last block per stage)")
    for r in rows[1:]:
        if r.get("log_formula_agrees") is False:
            print(f"NOTE: {r['schedule']} pp {r['pp']}: the trainer logs another formula value: {r['log_lines'][0]}")
    oversub = [pp for pp in args.pp if args.device == "cpu" and pp * args.threads > (os.cpu_count() or 1)]
    if oversub:
        print(f"NOTE: pp={', '.join(map(str, oversub))} runs more single-threaded ranks than this machine has cores "
              f"({os.cpu_count()}): oversubscribed, its step times and bubbles include waits for a core.")
    total = time.perf_counter() - t_start
    if others is not None:
        print(f"other processes on this machine used {others:.0f} CPU-s during the benchmark "
              f"({100 * others / (total * (os.cpu_count() or 1)):.1f}% of its {os.cpu_count()} cores): "
              "near 0 for a clean measurement")
    print(f"total {total:.0f} s")
    failed = [(r["schedule"], r["pp"], run) for r in rows for run in r["runs"] if "error" in run]
    for name, pp, run in failed:
        print(f"\nFAILED: {name} pp {pp}: {run['error']}\n  command: {run['command']}\n"
              + "\n".join("  | " + line for line in run["output_tail"].splitlines()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "args": vars(args), "rows": rows}, f, indent=2)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
