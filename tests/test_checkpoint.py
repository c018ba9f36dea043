"""Checkpoints: exact resume, crash and preemption safety (real processes), safe loading, HF conversion."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import SMALL_RUN, small_job

from moetrain.checkpoint.convert import load_checkpoint_model
from moetrain.checkpoint.manager import list_checkpoints, resolve_checkpoint
from moetrain.train import Trainer



def _run(run_dir, *overrides):
    trainer = Trainer(small_job(run_dir, *overrides))
    trainer.resume_or_init()
    return trainer, trainer.fit()


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_is_bit_exact(tmp_path):
    straight, losses = _run(tmp_path / "a", "train.steps=20")
    first, l1 = _run(tmp_path / "b", "train.steps=20", "train.stop_at=10")
    assert first.step == 10 and [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step_00000010"]
    second, l2 = _run(tmp_path / "b", "train.steps=20")
    assert second.step == 20
    assert l1 + l2 == losses
    _assert_same(_params(straight.model), _params(second.model))
    assert straight.optimizer.state_dict()["state"].keys() == second.optimizer.state_dict()["state"].keys()
    for k, st in straight.optimizer.state_dict()["state"].items():
        for name, v in st.items():
            assert torch.equal(v, second.optimizer.state_dict()["state"][k][name]), (k, name)
    biases = [m.expert_bias for m in second.model.modules() if hasattr(m, "expert_bias")]
    assert any(b.abs().sum() > 0 for b in biases)  # the balance state was restored, not re-zeroed


def test_async_save_resumes_like_sync(tmp_path):
    a, la = _run(tmp_path / "a", "train.steps=6", "checkpoint.interval=2", "checkpoint.async_save=true")
    b, lb = _run(tmp_path / "b", "train.steps=6", "checkpoint.interval=2")
    assert la == lb
    _assert_same(_params(load_checkpoint_model(resolve_checkpoint(tmp_path / "a" / "checkpoints"))),
                 _params(load_checkpoint_model(resolve_checkpoint(tmp_path / "b" / "checkpoints"))))


def _cli(run_dir, *overrides, env=None, wait=True):
    cmd = [sys.executable, "-m", "moetrain", "train", f"run.dir={run_dir}", *SMALL_RUN, *overrides]
    e = {**os.environ, **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e)
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=300)


def _final_weights(run_dir):
    return _params(load_checkpoint_model(resolve_checkpoint(run_dir / "checkpoints")))


def _wait_for(predicate, proc, timeout=120):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.stdout.read()[-2000:]
        assert time.time() - t0 < timeout
        time.sleep(0.05)


CRASH_RUN = ["train.steps=24", "checkpoint.interval=4"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The crash tests' reference: 24 steps in one go, every checkpoint kept (steps 4, 8, ..., 24)."""
    run = tmp_path_factory.mktemp("uninterrupted")
    ref = _cli(run, *CRASH_RUN, "checkpoint.keep_last=6")
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]
    return run


def _weights_at(run_dir, step):
    return _params(load_checkpoint_model(run_dir / "checkpoints" / f"step_{step:08d}"))


def test_kill9_mid_run_then_resume_matches_uninterrupted(tmp_path, uninterrupted):
    proc = _cli(tmp_path / "run", *CRASH_RUN, wait=False)
    _wait_for(lambda: (tmp_path / "run" / "checkpoints" / "step_00000008" / "COMPLETE").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    again = _cli(tmp_path / "run", *CRASH_RUN)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stdout
    _assert_same(_weights_at(uninterrupted, 24), _final_weights(tmp_path / "run"))


def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path, uninterrupted):
    run = tmp_path / "run"
    assert _cli(run, *CRASH_RUN, "train.stop_at=8").returncode == 0
    died = _cli(run, *CRASH_RUN, env={"MOETRAIN_FAULT_INJECT": "kill_during_save"})  # dies saving step 12
    assert died.returncode == -signal.SIGKILL
    partial = run / "checkpoints" / "step_00000012.partial"
    assert any(partial.glob("*.distcp")) and not (partial / "COMPLETE").exists()  # tensors written, not marked
    assert not (run / "checkpoints" / "step_00000012").exists()
    resumed = _cli(run, *CRASH_RUN, "train.stop_at=12")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "step_00000008" in resumed.stdout
    _assert_same(_weights_at(uninterrupted, 12), _weights_at(run, 12))


def test_truncated_file_falls_back_with_warning_naming_it(tmp_path, uninterrupted):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    victim = next((run / "checkpoints" / "step_00000024").glob("*.distcp"))
    victim.write_bytes(victim.read_bytes()[:100])
    resumed = _cli(run, "train.steps=26", "checkpoint.interval=4")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert str(victim) in resumed.stdout
    assert "resuming from" in resumed.stdout and "step_00000020" in resumed.stdout


# NOTE: SIGUSR1 (Slurm's warning) takes the same path end to end in test_launch's Slurm preemption test.
@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_preemption_signal_checkpoints_at_next_step_and_exits_zero(tmp_path, sig):
    run = tmp_path / "run"
    proc = _cli(run, "train.steps=100000", wait=False)
    metrics = run / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    ckpts = list_checkpoints(run / "checkpoints")
    assert [p.name for p in ckpts] == [f"step_{steps[-1]:08d}"]
    resumed = _cli(run, f"train.steps={steps[-1] + 2}")
    assert resumed.returncode == 0 and f"continuing after step {steps[-1]}" in resumed.stdout


def test_malicious_metadata_is_refused(tmp_path):
    _run(tmp_path, "train.steps=1")
    ckpt = resolve_checkpoint(tmp_path / "checkpoints")

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (ckpt / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(Exception, match="refusing to unpickle"):
        load_checkpoint_model(ckpt)
    assert not (tmp_path / "pwned").exists()


def test_reaching_a_saved_step_again_replaces_it_only_once_complete(tmp_path):
    _run(tmp_path, "train.steps=4", "checkpoint.interval=2")
    root = tmp_path / "checkpoints"
    trainer = Trainer(small_job(tmp_path, "train.steps=4", "checkpoint.interval=2",
                           f"checkpoint.resume={root / 'step_00000002'}"))
    trainer.resume_or_init()
    assert trainer.step == 2
    trainer.fit()
    assert [p.name for p in list_checkpoints(root)] == ["step_00000004", "step_00000002"]
    assert not list(root.glob("*.partial")) and not list(root.glob("*.replaced"))
    assert resolve_checkpoint(root).name == "step_00000004"


def test_resume_with_another_architecture_names_the_key(tmp_path):
    _run(tmp_path, "train.steps=1")
    trainer = Trainer(small_job(tmp_path, "train.steps=2", "model.moe.n_routed_experts=12", "model.moe.router.n_group=4"))
    with pytest.raises(ValueError, match="model.moe.n_routed_experts"):
        trainer.resume_or_init()


def test_attention_backend_is_no_architecture():
    """Checkpoints move between model.attn.backend values, and those saved before the key existed still resume."""
    import dataclasses

    from moetrain.checkpoint.resume import architecture_mismatch
    from conftest import small_config

    saved = dataclasses.asdict(small_config())
    del saved["attn"]["backend"]
    current = small_config()
    current.attn.backend = "flex"
    assert architecture_mismatch(saved, current) is None
    current.attn.v_head_dim = 16
    assert architecture_mismatch(saved, current) == "model.attn.v_head_dim"


def test_checkpoint_with_nested_optimizer_state_still_resumes(tmp_path):
    """Checkpoints saved before the optimizer state was flattened per parameter name (and DeepSpeed's, which is
    nested) store the same ``optim.state.<name>.<key>`` items: they resume with every Adam state intact."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from moetrain.checkpoint.integrity import write_complete_marker

    first = Trainer(small_job(tmp_path / "a", "train.steps=2"))
    first.resume_or_init()
    first.fit()
    ckpt = list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    for f in ckpt.glob("*.distcp"):
        f.unlink()
    model_sd, optim_sd = get_state_dict(first.model, first.optimizer)  # the nested form
    assert "state" in optim_sd and isinstance(optim_sd["param_groups"], list)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt), no_dist=True)
    write_complete_marker(ckpt, 2, 1)
    resumed = Trainer(small_job(tmp_path / "b", f"checkpoint.resume={ckpt}", "train.steps=3"))
    resumed.resume_or_init()
    assert resumed.step == 2
    want, got = first.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert want.keys() == got.keys() and want
    for i in want:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got[i][key], want[i][key]), (i, key)
    resumed.close()
