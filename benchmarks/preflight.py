"""Preflight of benchmarks/gpu.sh: can every step run here? Fails within seconds, naming what is missing.

Checks, each by a real import: torch (and its version), a CUDA device (unless --cpu), hydra, omegaconf and antlr4
(moetrain's config), transformers with DeepseekV3, and moetrain itself. Then the FP8 rows: bf16 and native FP8 run
anywhere; a Transformer Engine recipe runs only where moetrain's own check (the one its Trainer refuses by) passes,
and is otherwise listed as skipped with that reason. Writes a human summary (--machine) and the verdict (--json:
ok, checks, fp8_run, fp8_skipped) that benchmarks/fp8_step.py --plan reads.

    python benchmarks/preflight.py [--cpu] --machine OUT/machine.txt --json OUT/preflight.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys

MIN_TORCH = (2, 9)  # pyproject.toml: torch>=2.9
MIN_TRANSFORMERS = (4, 56)  # pyproject.toml's dev extra: the first with DeepseekV3's grouped_mm experts
# module -> distribution; not in the GPU machine's image: benchmarks/gpu_wheels.sh fetches them as wheels
CONFIG_MODULES = {"hydra": "hydra-core", "omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime"}
WHEELS_HINT = "not importable; on the GPU machine carry .whl (made here by `bash benchmarks/gpu_wheels.sh`)"
TE_ROWS = {"fp8 te blockwise": "blockwise", "fp8 te current": "current"}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("+")[0].split(".")[:2] if p.isdigit())


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "version unknown"


def _import(name: str):
    """(module, None) or (None, why)."""
    try:
        return importlib.import_module(name), None
    except Exception as e:  # noqa: BLE001 - any failure to import is the finding
        return None, f"{type(e).__name__}: {e}"


def check(cpu: bool) -> dict:
    checks: dict[str, dict] = {}

    def record(name: str, ok: bool, detail: str) -> None:
        checks[name] = {"ok": ok, "detail": detail}

    torch, why = _import("torch")
    if torch is None:
        record("torch", False, why)
    else:
        ok = _version(torch.__version__) >= MIN_TORCH
        record("torch", ok, f"{torch.__version__} (cuda {torch.version.cuda})"
               + ("" if ok else f"; moetrain needs >= {'.'.join(map(str, MIN_TORCH))}"))
        if not cpu:
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            record("cuda", n > 0, f"{torch.cuda.get_device_name(0)}, capability "
                   f"{'.'.join(map(str, torch.cuda.get_device_capability(0)))}" if n else
                   "no CUDA device visible to torch (use --cpu-smoke on a machine without one)")
    for name, dist in CONFIG_MODULES.items():
        mod, why = _import(name)
        record(name, mod is not None, _dist_version(dist) if mod else f"{why}; {WHEELS_HINT}")
    tf, why = _import("transformers")  # a lazy package: the model module is found, not imported (seconds)
    if tf is None:
        record("transformers", False, why)
    else:
        has_v3 = importlib.util.find_spec("transformers.models.deepseek_v3.modeling_deepseek_v3") is not None
        ok = has_v3 and _version(tf.__version__) >= MIN_TRANSFORMERS
        record("transformers", ok, tf.__version__ + ("" if ok else f"; gpu.sh needs DeepseekV3 (>= "
                                                                   f"{'.'.join(map(str, MIN_TRANSFORMERS))})"))
    train, why = _import("moetrain.train")
    record("moetrain", train is not None, train.__file__ if train else why)
    verdict = {"ok": all(c["ok"] for c in checks.values()), "checks": checks, "fp8_run": [], "fp8_skipped": {}}
    if train is not None and checks.get("torch", {}).get("ok"):
        _record_fp8_rows(verdict, torch, cpu)
    return verdict


def _record_fp8_rows(verdict: dict, torch, cpu: bool) -> None:
    te, why = _import("transformer_engine")
    verdict["checks"]["transformer_engine"] = {"ok": True, "optional": True,
                                               "detail": getattr(te, "__version__", "?") if te else f"absent ({why})"}
    device = "cpu" if cpu or not torch.cuda.is_available() else "cuda"
    verdict["fp8_run"], verdict["fp8_skipped"] = fp8_rows(device)


def fp8_rows(device: str) -> tuple[list[str], dict[str, str]]:
    """(rows of benchmarks/fp8_step.py that can run on ``device``, {row ruled out: why}), by the check the Trainer
    itself refuses FP8 by."""
    import torch

    from moetrain.precision import _fp8_unavailable

    run, skipped = ["bf16"], {}
    for row, recipe in TE_ROWS.items():
        reason = _fp8_unavailable("te", recipe, torch.device(device))
        if reason is None:
            run.append(row)
        else:
            skipped[row] = reason
    return run + ["fp8 native blockwise"], skipped


def _gpu_lines() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return ["nvidia-smi: not found"]
    done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=20)
    return [f"nvidia-smi: {line}" for line in (done.stdout or done.stderr).strip().splitlines()]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cpu", action="store_true", help="no CUDA device needed (gpu.sh --cpu-smoke)")
    p.add_argument("--machine", default=None, help="write the human summary here")
    p.add_argument("--json", default=None, help="write the verdict here")
    args = p.parse_args()
    verdict = check(args.cpu)
    lines = [datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
             f"python {sys.version.split()[0]} ({sys.executable})", *([] if args.cpu else _gpu_lines())]
    for name, c in verdict["checks"].items():
        lines.append(f"{'ok' if c['ok'] else 'MISSING':8s}{name}: {c['detail']}")
    missing = [name for name, c in verdict["checks"].items() if not c["ok"]]
    if not missing:
        lines += [f"fp8 rows to run: {', '.join(verdict['fp8_run'])}"]
        lines += [f"fp8 row skipped: {row}: {reason}" for row, reason in verdict["fp8_skipped"].items()]
    lines.append(f"preflight FAILED: missing {', '.join(missing)}" if missing else "preflight ok")
    print("\n".join(lines))
    if args.machine:
        with open(args.machine, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(verdict, f, indent=1)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
