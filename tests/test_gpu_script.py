"""benchmarks/gpu.sh, as CI can run it: --cpu-smoke runs every step of the GPU check at tiny shapes on CPU and
writes the numbers the GPU run writes; the preflight stops the script within seconds, naming a module that does not
import (made to fail for real: a sitecustomize that blocks it in sys.modules, as Python documents)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the device tool returns of $OUT: at most 8 files, 2 folders deep, plain names.
MAX_FILES, NAME = 8, re.compile(r"^[A-Za-z0-9._-]+$")


def _gpu_sh(out: Path, *args: str, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=300)


def _rows(path: Path, key: str) -> dict:
    return {r[key]: r for r in json.loads(path.read_text())["rows"] if key in r}


def test_cpu_smoke_runs_every_step_and_writes_their_numbers(tmp_path):
    out = tmp_path / "out"
    proc = _gpu_sh(out, "--cpu-smoke")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "gpu.sh: every step passed" in proc.stdout
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= MAX_FILES, files
    assert all(len(p.relative_to(out).parts) <= 3 and all(NAME.match(s) for s in p.relative_to(out).parts)
               for p in files), files
    assert (out / "gpu.log").read_text() == proc.stdout  # the log holds everything the run printed
    assert json.loads((out / "preflight.json").read_text())["ok"]

    train = _rows(out / "train_step.json", "impl")
    assert set(train) == {"moetrain Trainer", "transformers loop"}
    for row in train.values():
        assert row["tokens_per_s"] > 0 and row["tflops"] > 0, row
        assert row["host_syncs_per_step"] >= 0
    # moetrain's budget (tests/test_host_syncs.py): one host read per step, the losses and the norm in one transfer.
    assert train["moetrain Trainer"]["host_syncs_by_op"] == {"tolist": 1}
    assert train["moetrain Trainer"]["host_syncs_per_step"] == 1

    fp8 = _rows(out / "fp8_step.json", "precision")
    assert json.loads((out / "fp8_step.json").read_text())["rows"][-1]["failed"] == []
    for name in ("bf16", "fp8 native blockwise"):
        assert fp8[name]["step_ms"] > 0 and math.isfinite(fp8[name]["final_loss"]), fp8[name]
    for name in ("fp8 te blockwise", "fp8 te current"):  # ruled out by the preflight on CPU: listed, not run
        assert "CUDA" in fp8[name]["skipped"], fp8[name]


def test_preflight_names_a_module_that_does_not_import_and_stops_before_any_step(tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['omegaconf'] = None  # import fails\n")
    out = tmp_path / "out"
    proc = _gpu_sh(out, "--cpu-smoke", pythonpath=str(blocker))
    assert proc.returncode == 2, proc.stdout[-4000:]
    assert re.search(r"^MISSING\s+omegaconf: ModuleNotFoundError", proc.stdout, re.M), proc.stdout
    assert "preflight FAILED: missing" in proc.stdout and "omegaconf" in proc.stdout.splitlines()[-2]
    # It stops before any step: what runs is imports only (seconds), never a model. NOTE: no wall-clock bound here;
    # CI's load would make one flaky, and the order is what guarantees it.
    assert "no step was run" in proc.stdout and not (out / "train_step.json").exists()
    assert not (out / "fp8_step.json").exists() and "== train_step" not in proc.stdout
