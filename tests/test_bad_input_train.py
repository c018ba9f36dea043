"""Bad input to the trainer: config errors, a busy run directory, divergence, resumes onto other data.

Each test crafts the situation for real (a second process holding the lock, a learning rate that overflows, a
checkpoint of other data) and checks what the user is told and that nothing already written is damaged.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import SMALL_RUN, small_job

from moetrain.checkpoint.manager import list_checkpoints
from moetrain.config import compose, to_job_config
from moetrain.model import ConfigError
from moetrain.run_dir import RunDirLock, RunDirLocked
from moetrain.train import Trainer, TrainingDiverged



def _trainer(run_dir, *overrides):
    trainer = Trainer(small_job(run_dir, *overrides))
    trainer.resume_or_init()
    return trainer


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "moetrain", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize("overrides,key", [
    (["train.micro_batch_size=0"], "train.micro_batch_size"),
    (["train.global_batch_size=0"], "train.global_batch_size"),
    (["train.global_batch_size=-8"], "train.global_batch_size"),
    (["optim.lr=inf"], "optim.lr"),
    (["optim.betas=[0.9,nan]"], "optim.betas"),
    (["model.rope.rope_theta=inf"], "model.rope.rope_theta"),
    (["train.val_interval=5", "data.val_fraction=0"], "train.val_interval"),
    (["parallel.dp=3"], "parallel.dp"),
    (["train.max_nonfinite_steps=0"], "train.max_nonfinite_steps"),
])
def test_config_errors_name_their_own_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        to_job_config(compose(overrides))
    assert e.value.key == key, str(e.value)


def test_dp_not_matching_the_world_is_named_as_itself(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError) as e:
        to_job_config(compose(["parallel.dp=3", "train.global_batch_size=12", "train.micro_batch_size=4"]))
    assert e.value.key == "parallel.dp" and "world size 4" in str(e.value)


@pytest.mark.parametrize("args,key", [
    (["train.micro_batch_size=0"], "train.micro_batch_size"),
    (["optim.lr=inf"], "optim.lr"),
    (["train.no_such_key=1"], "train.no_such_key"),
])
def test_cli_config_error_is_one_line_with_exit_status_2(tmp_path, args, key):
    proc = _cli("train", *args, f"run.dir={tmp_path}/run")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moetrain: error:") and key in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()  # a refused run leaves no directory behind
    if key == "optim.lr":  # one kind of error suffices: Hydra's switch gives the traceback back
        full = _cli("train", *args, f"run.dir={tmp_path}/run", env={"HYDRA_FULL_ERROR": "1"})
        assert full.returncode != 0 and "Traceback" in full.stderr


# ------------------------------------------------------------------------------------------------ run dir lock
_HOLD = """
import sys, time
from moetrain.run_dir import RunDirLock
lock = RunDirLock(sys.argv[1]).acquire()  # held while this process lives
print("locked", flush=True)
time.sleep(600)
"""


def test_second_run_on_a_run_dir_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    _trainer(run_dir, "train.steps=1").fit()
    config_before = (run_dir / "config.yaml").read_text()
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked, match=f"pid {holder.pid}"):
            Trainer(small_job(run_dir, "train.steps=2", "optim.lr=1e-3"))
        proc = _cli("train", f"run.dir={run_dir}", *SMALL_RUN, "train.steps=2")
        assert proc.returncode == 2 and f"pid {holder.pid}" in proc.stderr, proc.stderr
        assert (run_dir / "config.yaml").read_text() == config_before  # the refused runs wrote nothing
        assert (run_dir / "metrics.jsonl").read_text() == metrics_before
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: its file stays, naming a dead process
        holder.wait()
    assert json.loads((run_dir / ".lock").read_text())["pid"] == holder.pid
    trainer = _trainer(run_dir, "train.steps=2")
    trainer.fit()
    assert _steps(run_dir) == [1, 2]
    assert f"pid {holder.pid}" in (run_dir / "train.log").read_text()  # the takeover is logged
    RunDirLock(run_dir).acquire().release()  # released at the end of the run


# ------------------------------------------------------------------------------------------------ divergence
def test_nonfinite_loss_stops_naming_the_step_and_saves_no_checkpoint(tmp_path, capsys):
    # lr 1e30 keeps step 1 finite (the loss is computed before the update) and overflows everything after it.
    with pytest.raises(TrainingDiverged, match="at step 2") as e:
        _trainer(tmp_path, "optim.lr=1e30", "optim.min_lr=0", "optim.warmup_steps=0", "train.steps=5",
                 "checkpoint.interval=1", "logging.console=true").fit()
    assert "train.max_nonfinite_steps=1" in str(e.value)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000001"]
    assert not list((tmp_path / "checkpoints").glob("*.partial"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert {records[1]["loss"], records[1]["grad_norm"]} & {"nan", "inf", "-inf"}
    assert "step 2/5" in capsys.readouterr().out  # the console line of the non-finite step printed
    RunDirLock(tmp_path).acquire().release()  # the lock was released by the failure


def test_tolerated_nonfinite_steps_skip_their_updates(tmp_path):
    trainer = _trainer(tmp_path, "optim.lr=1e30", "optim.min_lr=0", "optim.warmup_steps=0", "train.steps=6",
                       "train.max_nonfinite_steps=3")
    after_step_1 = {}

    def snapshot():
        if trainer.step == 2:  # called before step 2 runs: the parameters after the one finite update
            after_step_1.update({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        return original()

    original, trainer.train_step = trainer.train_step, snapshot
    with pytest.raises(TrainingDiverged, match="at step 4"):
        trainer.fit()
    now = trainer.model.state_dict()
    for k, v in after_step_1.items():  # steps 2-4 were skipped: parameters and router biases untouched
        assert torch.equal(now[k], v), k
    log = (tmp_path / "train.log").read_text()
    assert "step 2: non-finite" in log and "step 3: non-finite" in log


def test_cli_divergence_is_one_line_with_exit_status_1(tmp_path):
    proc = _cli("train", f"run.dir={tmp_path}", *SMALL_RUN, "optim.lr=1e30", "optim.warmup_steps=0", "train.steps=4")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("moetrain: error: training diverged at step 2")
    assert "Traceback" not in proc.stderr
    assert list_checkpoints(tmp_path / "checkpoints") == []
    # The console has one line; the rank's log has the traceback, train.log the step lines up to it.
    rank_log = (tmp_path / "logs" / "rank_0.log").read_text()
    assert "ERROR training stopped at step 2: TrainingDiverged" in rank_log and "Traceback" in rank_log
    assert "step 1/4 [" in (tmp_path / "train.log").read_text()


# ------------------------------------------------------------------------------------------------ resume records
def test_metrics_hold_each_step_once_after_resuming_from_an_older_checkpoint(tmp_path):
    _trainer(tmp_path, "train.steps=3", "checkpoint.interval=2").fit()
    import shutil

    shutil.rmtree(tmp_path / "checkpoints" / "step_00000003")  # as if the run died before saving step 3
    first_step_3 = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[2])
    resumed = _trainer(tmp_path, "train.steps=3", "checkpoint.interval=2")
    assert resumed.step == 2
    resumed.fit()
    assert _steps(tmp_path) == [1, 2, 3]
    replaced = [json.loads(line) for line in (tmp_path / "metrics.replaced.jsonl").read_text().splitlines()]
    assert replaced == [first_step_3]


def test_resume_onto_other_data_is_refused_unless_allowed(tmp_path):
    _trainer(tmp_path, "train.steps=2").fit()
    config_before = (tmp_path / "config.yaml").read_text()
    for override, key in (("train.seq_len=32", "train.seq_len"), ("data.val_fraction=0.05", "data.val_fraction"),
                          ("data.seed=7", "data.seed"), ("data.demo_bytes=300000", "data.paths")):
        with pytest.raises(ConfigError) as e:
            _trainer(tmp_path, "train.steps=3", override)
        assert e.value.key == key and "checkpoint.allow_data_change" in str(e.value)
        assert (tmp_path / "config.yaml").read_text() == config_before
    trainer = _trainer(tmp_path, "train.steps=3", "train.seq_len=32", "checkpoint.allow_data_change=true")
    assert trainer.step == 2 and trainer.loader.consumed == 2 * 8
    trainer.fit()
    assert "train.seq_len changed" in (tmp_path / "train.log").read_text()
    assert "seq_len: 32" in (tmp_path / "config.yaml").read_text()  # the record matches what was trained


def test_refused_resume_into_a_new_run_dir_leaves_nothing(tmp_path):
    _trainer(tmp_path / "a", "train.steps=1").fit()
    other = tmp_path / "b"
    with pytest.raises(ConfigError, match="model.n_layers"):
        _trainer(other, "train.steps=2", "model.n_layers=3", f"checkpoint.resume={tmp_path / 'a' / 'checkpoints'}")
    assert not other.exists()


def test_unwritable_run_dir_is_a_named_refusal(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RunDirLocked, match=f"run.dir {blocker / 'run'}: cannot create"):
        Trainer(small_job(blocker / "run"))
