"""FSDP2 over 2 gloo ranks (real torchrun processes) reproduces the single-process run."""

import json
import subprocess
import sys

ARGS = ["train.steps=4", "logging.interval=1", "data.demo_bytes=200000", "train.seq_len=64", "train.val_interval=0",
        "train.global_batch_size=16", "train.micro_batch_size=4", "logging.console=false"]


def _losses(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_two_ranks_match_one_process(tmp_path):
    single = subprocess.run([sys.executable, "-m", "moetrain", "train", f"run.dir={tmp_path / 'one'}", *ARGS],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "moetrain", "train", f"run.dir={tmp_path / 'two'}", *ARGS],
                           capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "expert_bias_abs_mean"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
        assert a["max_violation_per_layer"] == b["max_violation_per_layer"]


def test_checkpoint_reshards_from_two_ranks_to_one(tmp_path):
    """Saved by FSDP over 2 ranks at step 2, resumed by one process: ends where one process alone ends."""
    import torch

    from moetrain.checkpoint.convert import load_checkpoint_model
    from moetrain.checkpoint.manager import resolve_checkpoint

    run, ref = tmp_path / "run", tmp_path / "ref"
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "moetrain", "train", f"run.dir={run}", "train.stop_at=2", *ARGS],
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    for run_dir in (run, ref):
        one = subprocess.run([sys.executable, "-m", "moetrain", "train", f"run.dir={run_dir}", *ARGS],
                             capture_output=True, text=True, timeout=300)
        assert one.returncode == 0, one.stderr[-3000:]
    assert "saved by 2 ranks" in (run / "train.log").read_text()
    a = load_checkpoint_model(resolve_checkpoint(run / "checkpoints")).state_dict()
    b = load_checkpoint_model(resolve_checkpoint(ref / "checkpoints")).state_dict()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
