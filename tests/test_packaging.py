"""The built wheel is what users install on clusters: it must carry the Hydra config tree and train from anywhere."""

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_listed_packages_are_every_package_directory():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "moetrain").rglob("__init__.py")}
    assert listed == found | {"moetrain.conf"}


def test_built_wheel_trains_the_demo_from_another_directory(tmp_path):
    wheels, target, work, src = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere", tmp_path / "src"
    work.mkdir()
    # From a clean copy of the tracked files: a build/ left in the checkout would otherwise be reused.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("moetrain-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # The installed copy, not the checkout, is imported (PYTHONPATH comes before the editable install).
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import moetrain, moetrain.resources as r, moetrain.model.presets as p;"
                            "print(moetrain.__file__); print(r.conf_dir()); print(p.load_preset('proxy').n_layers)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert where[0].startswith(str(target)) and where[1].startswith(str(target)), where
    assert int(where[2]) > 0
    proc = subprocess.run([sys.executable, "-m", "moetrain", "train", "run.dir=run", "train.steps=2",
                           "data.demo_bytes=20000", "train.seq_len=32", "train.micro_batch_size=4",
                           "train.global_batch_size=4", "train.val_interval=0", "logging.console=false",
                           "data.cache_dir=cache"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "run" / "checkpoints" / "step_00000002" / "COMPLETE").exists()
