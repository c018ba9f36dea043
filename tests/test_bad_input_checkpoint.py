"""Checkpoints under bad input: crafted pickles, damaged files, unwritable or full disks, Ctrl-C, NaN, broken HF
directories. Every case uses a real file damaged on disk (or a real process and signal) and checks that the error
or warning names the culprit and that the previous checkpoint stays usable."""

import io
import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import SMALL_RUN, small_job

from moetrain.checkpoint import convert
from moetrain.checkpoint.convert import load_checkpoint_model, write_hf
from moetrain.checkpoint.integrity import COMPLETE, read_marker, verify_complete, write_complete_marker
from moetrain.checkpoint.manager import CheckpointError, resolve_checkpoint
from moetrain.checkpoint.safe_reader import load_state, read_metadata_file
from moetrain.train import Trainer

STEP2, STEP4 = "step_00000002", "step_00000004"


def _trainer(run_dir, *overrides):
    return Trainer(small_job(run_dir, "train.steps=6", *overrides))


def _resume(run_dir, *overrides):
    trainer = _trainer(run_dir, *overrides)
    trainer.resume_or_init()
    return trainer


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """A run with two complete checkpoints, step 2 and step 4."""
    run = tmp_path_factory.mktemp("golden")
    trainer = _trainer(run, "train.stop_at=4", "checkpoint.interval=2")
    trainer.resume_or_init()
    trainer.fit()
    return run


@pytest.fixture
def run(golden, tmp_path):
    shutil.copytree(golden, tmp_path / "run")
    return tmp_path / "run"


def _rewrite_marker(ckpt: Path, checksums: bool = True) -> None:
    """Make COMPLETE agree with the files as they are now (as an attacker would), or an old size-only marker."""
    write_complete_marker(ckpt, read_marker(ckpt)["step"], 1)
    if not checksums:
        marker = json.loads((ckpt / COMPLETE).read_text())
        del marker["checksum"], marker["checksums"]
        (ckpt / COMPLETE).write_text(json.dumps(marker))


def _assert_falls_back_naming(run_dir: Path, victim: Path) -> None:
    """resume=auto skips step 4 with a warning naming ``victim`` and resumes step 2; the explicit path is an error."""
    with pytest.warns(UserWarning, match=re.escape(str(victim))):
        trainer = _resume(run_dir)
    assert trainer.step == 2
    trainer.close()  # the run directory's lock, for the next resume
    with pytest.raises(CheckpointError, match=re.escape(str(victim))):
        _resume(run_dir, f"checkpoint.resume={victim.parent}")


# ------------------------------------------------------------------------------------------ crafted pickles
class _CreatesFile:
    """Unpickling this calls ``open(marker, "w")``: it creates an empty marker file and does nothing else."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _replace_item(ckpt: Path, key: str, payload: bytes) -> None:
    """Put ``payload`` in place of the non-tensor item ``key`` in its .distcp file and make the DCP offsets,
    lengths and COMPLETE (sizes, checksums) consistent, as an attacker would."""
    metadata = pickle.loads((ckpt / ".metadata").read_bytes())  # our own file, read to craft it
    index = next(i for i in metadata.storage_data if i.fqn == key)
    victim = metadata.storage_data[index]
    data = (ckpt / victim.relative_path).read_bytes()
    start, delta = victim.offset, len(payload) - victim.length
    (ckpt / victim.relative_path).write_bytes(data[:start] + payload + data[start + victim.length:])
    for info in metadata.storage_data.values():
        if info.relative_path == victim.relative_path and info.offset > start:
            info.offset += delta
    victim.length = len(payload)
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    _rewrite_marker(ckpt)


def test_crafted_optimizer_item_is_refused_not_unpickled(run, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = run / "checkpoints" / STEP4
    trainer = _trainer(run)
    name = next(n for n, p in trainer.model.named_parameters() if p.ndim >= 2)
    item = f"optim.param_groups.{name}.lr"  # a non-tensor item, stored pickled by DCP
    buf = io.BytesIO()
    torch.save(_CreatesFile(marker), buf)
    _replace_item(ckpt, item, buf.getvalue())
    assert verify_complete(ckpt) is None  # sizes, checksums and metadata all look right
    # Resume reads the optimizer's tensors only (hyperparameters come from the config): the item is never read.
    trainer.resume_or_init()
    assert trainer.step == 4 and not marker.exists()
    trainer.close()
    # Read on purpose through moetrain's one DCP entry point, it is refused by name, not unpickled.
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(ckpt))}: refusing .*'{re.escape(item)}'"):
        load_state({"optim": {item.removeprefix("optim."): 0.0}}, ckpt, True)
    assert not marker.exists()
    # The same bytes through DCP's own planner (weights_only=False) do run the payload: the test is live.
    try:
        dcp.load({"optim": {item.removeprefix("optim."): 0.0}}, checkpoint_id=str(ckpt), no_dist=True)
    except BaseException:  # DCP may fail after the payload ran; only the marker matters here
        pass
    assert marker.exists()


def _global_call(module: str, name: str, arg: str) -> bytes:
    """A protocol-4 pickle calling ``module``'s attribute ``name`` (dotted names allowed) with one argument."""
    def text(s):
        return pickle.SHORT_BINUNICODE + bytes([len(s)]) + s.encode()
    return b"\x80\x04" + text(module) + text(name) + pickle.STACK_GLOBAL + text(arg) + pickle.TUPLE1 + \
        pickle.REDUCE + pickle.STOP


def test_metadata_allow_list_refuses_names_reached_through_an_allowed_module(run, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = run / "checkpoints" / STEP4
    # torch.distributed.checkpoint.filesystem imports os: "os.mkdir" under it is os.mkdir itself.
    (ckpt / ".metadata").write_bytes(_global_call("torch.distributed.checkpoint.filesystem", "os.mkdir", str(marker)))
    _rewrite_marker(ckpt)
    with pytest.raises(CheckpointError, match="refusing to unpickle torch.distributed.checkpoint.filesystem.os.mkdir"):
        resolve_checkpoint(ckpt)
    _assert_falls_back_naming(run, ckpt / ".metadata")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ damaged files
def _flip_middle_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _zero_same_size(f: Path) -> None:
    f.write_bytes(bytes(f.stat().st_size))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@pytest.mark.parametrize("victim, damage, checksums", [
    ("__0_0.distcp", _flip_middle_byte, True),      # same size: only the CRC-32 sees it
    (".metadata", _flip_middle_byte, True),
    (".metadata", _zero_same_size, False),          # old size-only marker: the metadata must still parse
    (".metadata", _truncate, False),                # ... and a marker whose sizes were made to agree
    ("trainer_state.json", _zero_same_size, False),
    ("trainer_state.json", _flip_middle_byte, True),
    ("config.yaml", _zero_same_size, False),
])
def test_damaged_file_falls_back_or_is_named(run, victim, damage, checksums):
    ckpt = run / "checkpoints" / STEP4
    if not checksums:
        _rewrite_marker(ckpt, checksums=False)
    damage(ckpt / victim)
    if not checksums:
        _rewrite_marker(ckpt, checksums=False)  # the sizes agree: only parsing can tell
    _assert_falls_back_naming(run, ckpt / victim)


def test_old_marker_without_checksums_still_loads(run):
    _rewrite_marker(run / "checkpoints" / STEP4, checksums=False)
    assert _resume(run).step == 4


# ------------------------------------------------------------------------------------------ saving
def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")


def test_unwritable_checkpoint_dir_fails_at_start_naming_it(run, tmp_path):
    (tmp_path / "afile").write_text("")
    ckpt_dir = tmp_path / "afile" / "checkpoints"  # root ignores permission bits, not a file in the path
    with pytest.raises(CheckpointError, match=rf"checkpoint.dir={re.escape(str(ckpt_dir))} is not writable: "
                                              "Not a directory"):
        _trainer(run, f"checkpoint.dir={ckpt_dir}")


def test_read_only_checkpoint_dir_fails_at_start_naming_it(run, tmp_path):
    _mount_tmpfs(tmp_path / "ro", "ro,size=1m")
    try:
        with pytest.raises(CheckpointError, match=rf"checkpoint.dir={re.escape(str(tmp_path / 'ro'))} is not "
                                                  "writable: Read-only file system"):
            _trainer(run, f"checkpoint.dir={tmp_path / 'ro'}")
    finally:
        subprocess.run(["umount", str(tmp_path / "ro")], check=True)


def _assert_save_failure_keeps_step4(trainer, ckpt_dir: Path, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        trainer.fit()
    assert not (ckpt_dir / "step_00000006").exists() and not list(ckpt_dir.glob("*.partial"))
    assert resolve_checkpoint(ckpt_dir).name == STEP4


def test_disk_full_during_save_is_named_and_keeps_previous(run, tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=8m")
    try:
        shutil.copytree(run / "checkpoints" / STEP4, disk / STEP4)
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(bytes(max(0, free - 256 * 1024)))  # room for the small files only
        trainer = _resume(run, f"checkpoint.dir={disk}")
        assert trainer.step == 4
        _assert_save_failure_keeps_step4(
            trainer, disk, rf"no space left on device writing {re.escape(str(disk / 'step_00000006.partial'))}; "
                           rf"the previous checkpoint {re.escape(str(disk / STEP4))} is intact")
        (disk / "filler").unlink()
        load_checkpoint_model(disk / STEP4)
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_file_size_limit_during_save_is_named_and_keeps_previous(run):
    """Without root (no tmpfs): RLIMIT_FSIZE makes the large write fail with EFBIG, another OS error."""
    trainer = _resume(run)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so the write fails instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        _assert_save_failure_keeps_step4(trainer, run / "checkpoints",
                                         rf"cannot write .*step_00000006.partial \(File too large\); the previous "
                                         rf"checkpoint .*{STEP4} is intact")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def test_ctrl_c_during_save_reports_and_keeps_previous(run):
    root = run / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "moetrain", "train", f"run.dir={run}", *SMALL_RUN, "train.steps=6"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "MOETRAIN_FAULT_INJECT": "sleep_during_save"})
    try:
        t0 = time.time()
        while not (root / "step_00000006.partial" / ".metadata").exists():  # tensors written, now sleeping
            assert proc.poll() is None and time.time() - t0 < 120, proc.stdout.read()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert f"checkpoint: interrupted while saving {root / 'step_00000006.partial'}; the previous checkpoint " \
           f"{root / STEP4} is intact" in out, out[-2000:]
    assert not (root / "step_00000006").exists() and not list(root.glob("*.partial"))
    assert _resume(run).step == 4


def test_non_finite_state_is_never_saved(run):
    trainer = _resume(run)
    name, param = next(iter(trainer.model.named_parameters()))
    with torch.no_grad():
        saved = param.clone()
        param.view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match=rf"non-finite values: parameter {re.escape(name)} holds NaN or inf"):
        trainer.save_checkpoint()
    with torch.no_grad():
        param.copy_(saved)
    trainer.optimizer.state[param]["exp_avg"].view(-1)[0] = float("inf")
    with pytest.raises(CheckpointError, match=rf"optimizer state exp_avg of {re.escape(name)} holds NaN or inf"):
        trainer.save_checkpoint()
    assert not list((run / "checkpoints").glob("*.partial"))
    assert verify_complete(run / "checkpoints" / STEP4) is None


# ------------------------------------------------------------------------------------------ paths and HF import
@pytest.mark.parametrize("kind", ["file", "missing"])
def test_resume_path_must_be_a_directory(run, kind):
    target = run / "train.log" if kind == "file" else run / "nowhere"
    what = "is a file" if kind == "file" else "does not exist"
    trainer = _trainer(run, f"checkpoint.resume={target}")
    with pytest.raises(CheckpointError, match=rf"checkpoint.resume={re.escape(str(target))}: .* {what}; give a "
                                              "checkpoint directory \\(step_N\\) or a checkpoint.dir"):
        trainer.resume_or_init()


@pytest.fixture(scope="module")
def hf_dir(golden, tmp_path_factory):
    """The golden model in the HF format, in several shards."""
    out = tmp_path_factory.mktemp("hf") / "hf"
    write_hf(load_checkpoint_model(golden / "checkpoints" / STEP4), out, max_shard_bytes=1 << 20)
    assert len(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    return out


def _break_index(d: Path) -> tuple[Path, str]:
    (d / "model.safetensors.index.json").write_text('{"weight_map": {')
    return d / "model.safetensors.index.json", "not valid JSON"


def _drop_shard(d: Path) -> tuple[Path, str]:
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.unlink()
    return shard, "is missing (named in model.safetensors.index.json's weight_map)"


def _garble_shard(d: Path) -> tuple[Path, str]:
    shard = sorted(d.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"this is not a safetensors file")
    return shard, "is not a safetensors file"


@pytest.mark.parametrize("damage", [_break_index, _drop_shard, _garble_shard])
def test_from_hf_with_broken_directory_exits_2_naming_the_file(hf_dir, tmp_path, capsys, damage):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    culprit, what = damage(bad)
    assert convert.main(["--from-hf", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(culprit) in err and what in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_convert_cli_bad_input_is_one_line_and_status_2(hf_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    index, _ = _break_index(bad)
    proc = subprocess.run([sys.executable, "-m", "moetrain", "convert", "--from-hf", str(bad), str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and str(index) in proc.stderr, proc.stderr


def test_to_hf_from_a_missing_checkpoint_exits_2_naming_it(tmp_path, capsys):
    assert convert.main(["--to-hf", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'nowhere'} does not exist" in err, err


def test_every_checkpoint_load_goes_through_the_safe_reader():
    """dcp.load, torch.load and pickle loading appear only in safe_reader.py, which guards them."""
    package = Path(__file__).resolve().parents[1] / "moetrain"
    pattern = re.compile(r"\b(dcp\.load|torch\.load|pickle\.loads?)\(|\bUnpickler\b")
    offenders = [f"{f.relative_to(package)}:{n}" for f in package.rglob("*.py") if f.name != "safe_reader.py"
                 for n, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_metadata_naming_a_storage_file_outside_the_checkpoint_is_refused(run):
    """A .metadata (only allow-listed classes) whose storage entry points at another checkpoint's file: the load
    would read bytes no COMPLETE checksum covers."""
    ckpt = run / "checkpoints" / STEP4
    metadata = read_metadata_file(ckpt / ".metadata")
    for info in metadata.storage_data.values():
        info.relative_path = f"../{STEP2}/{info.relative_path}"
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    _rewrite_marker(ckpt)
    with pytest.raises(CheckpointError, match="not a plain file name"):
        resolve_checkpoint(ckpt)
    _assert_falls_back_naming(run, ckpt / ".metadata")
