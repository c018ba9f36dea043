"""DeepSpeed ZeRO-1/2 (``parallel.dp_strategy=deepspeed``, real torchrun processes over gloo, DeepSpeed's CPU
accelerator) reproduces the single-process run, with and without expert parallelism and optimizer offload.

Each layout trains the tiny model for 3 optimizer steps on the same global batch: losses, gradient norms, every
parameter and every router bias must equal one process's (fp32, tests/layouts.py's bounds). Every run checkpoints
at step 2;
a ZeRO-2 (ep=2, dp=2) checkpoint resumes with DeepSpeed at the same layout, and a ZeRO-1 (ep=1, dp=2) checkpoint
resumes under FSDP in one process; both continue the uninterrupted run exactly.
"""

import os
import shutil

import pytest

from moetrain.checkpoint.convert import main as convert_main
from layouts import assert_close_records, assert_same_model, train_layout

pytestmark = pytest.mark.slow
STEP2 = ("checkpoints", "step_00000002")


@pytest.fixture(scope="module", autouse=True)
def _cpu_accelerator():
    # Inherited by the torchrun subprocesses: DeepSpeed's CPU accelerator (gloo), no CUDA probing.
    old = os.environ.get("DS_ACCELERATOR")
    os.environ["DS_ACCELERATOR"] = "cpu"
    yield
    if old is None:
        os.environ.pop("DS_ACCELERATOR")
    else:
        os.environ["DS_ACCELERATOR"] = old


@pytest.fixture(scope="module")
def reference(fp32_reference):
    return fp32_reference


def _deepspeed(run_dir, ep, dp, stage, *overrides):
    return train_layout(run_dir, dp, "parallel.dp_strategy=deepspeed", f"parallel.ep={ep}",
                        f"parallel.zero_stage={stage}", *overrides)


# ep 2 with ZeRO-1 is the layout of test_init_from_hf_reaches_zero_master_weights (against one process too), and
# ep 2 with ZeRO-2 is test_deepspeed_zero2_expert_parallel_matches_and_resumes': no launch of its own here.
@pytest.mark.parametrize("ep,dp,stage,offload", [(1, 2, 1, False), (1, 2, 2, True)])
def test_deepspeed_layout_matches_one_process(tmp_path, reference, ep, dp, stage, offload):
    ref_dir, ref = reference
    records = _deepspeed(tmp_path, ep, dp, stage, f"parallel.offload_optimizer={str(offload).lower()}")
    assert_close_records(records, ref)
    assert_same_model(tmp_path, ref_dir)
    if (ep, stage) == (1, 1):  # the checkpoint resumes under FSDP, in one process
        resumed = tmp_path / "fsdp"
        records = train_layout(resumed, 1, "parallel.dp_strategy=fsdp",
                               f"checkpoint.resume={tmp_path.joinpath(*STEP2)}")
        assert_close_records(records, ref[2:])  # step 3 continues the uninterrupted run
        assert_same_model(resumed, ref_dir)


def test_deepspeed_zero2_expert_parallel_matches_and_resumes(tmp_path, reference):
    ref_dir, ref = reference
    run = tmp_path / "run"
    assert_close_records(_deepspeed(run, 2, 2, 2), ref)
    assert_same_model(run, ref_dir)
    resumed = tmp_path / "resumed"
    records = _deepspeed(resumed, 2, 2, 2, f"checkpoint.resume={run.joinpath(*STEP2)}")
    assert_close_records(records, ref[2:])
    assert_same_model(resumed, ref_dir)
    shutil.rmtree(run)


def test_init_from_hf_reaches_zero_master_weights(tmp_path, reference):
    """Hugging Face weights start a deepspeed (ep=2) run exactly as they start one process, beyond step 1
    (ZeRO updates its own fp32 masters, which must hold the imported weights)."""
    ref_dir, ref = reference
    hf = tmp_path / "hf"
    assert convert_main(["--to-hf", str(ref_dir / "checkpoints"), str(hf)]) == 0
    one = train_layout(tmp_path / "one", 1, f"checkpoint.init_from_hf={hf}", "train.steps=2")
    ds = _deepspeed(tmp_path / "ds", 2, 2, 1, f"checkpoint.init_from_hf={hf}", "train.steps=2")
    assert_close_records(ds, one)
    assert one[0]["loss"] < ref[0]["loss"] - 0.1  # trained weights, not a fresh initialisation
