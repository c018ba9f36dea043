"""An FSDP2 checkpoint of 2 gloo ranks (real torchrun processes) resumes in one process (the equality of the
layouts themselves: tests/test_expert_parallel.py)."""

import subprocess
import sys

from layouts import MAX_RESTARTS

ARGS = ["train.steps=4", "logging.interval=1", "data.demo_bytes=200000", "train.seq_len=64", "train.val_interval=0",
        "train.global_batch_size=16", "train.micro_batch_size=4", "logging.console=false"]


def test_checkpoint_reshards_from_two_ranks_to_one(tmp_path):
    """Saved by FSDP over 2 ranks at step 2, resumed by one process: ends where one process alone ends."""
    import torch

    from moetrain.checkpoint.convert import load_checkpoint_model
    from moetrain.checkpoint.manager import resolve_checkpoint

    run, ref = tmp_path / "run", tmp_path / "ref"
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "--max-restarts", MAX_RESTARTS, "-m", "moetrain", "train", f"run.dir={run}",
                          "train.stop_at=2", *ARGS],
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
