"""Pipeline parallelism (real torchrun processes over gloo) reproduces the single-process run.

Every layout trains the tiny model (4 blocks, 8 experts, MTP) for 3 optimizer steps on the same global batch
(4 micro-batches of 4 per step at dp 1) and validates after step 3: losses, gradient norms, validation loss,
every parameter and every router bias must equal one process's (fp32, tests/layouts.py's bounds). Checkpoints reshard
between pp = 2 x dp = 2 and one process both ways, and a pp = 2 checkpoint exports to the same HF weights.
"""

import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from moetrain.checkpoint.convert import main as convert_main
from moetrain.config import compose, to_job_config
from moetrain.hf import from_hf_pretrained
from moetrain.model import ConfigError
from moetrain.parallel.pipeline_layout import SCHEDULES, balanced_layout, resolve_layout, stage_ranks
from layouts import assert_close_records, assert_same_model, train_layout, train_reference

VAL = ["train.val_interval=3", "train.val_batches=2"]
# MTP depth 2 and document masking: the last stage's MTP modules need the tokens and the masks of its inputs.
DEEP = ["model.n_mtp_layers=2", "data.document_mask=true"]


def _train(run_dir, nproc, *overrides):
    return train_layout(run_dir, nproc, *VAL, *overrides)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """One process, MTP depth 1."""
    run = tmp_path_factory.mktemp("ref")
    return run, train_reference(run, *VAL)


@pytest.fixture(scope="module")
def ref_deep(tmp_path_factory):
    """One process, MTP depth 2 with document masking."""
    run = tmp_path_factory.mktemp("ref_deep")
    return run, train_reference(run, *VAL, *DEEP)


def _check_pipeline_run(run_dir, records, reference, pp, val=True):
    """``val``: compare the validation loss too (it covers train.val_batches x dp micro-batches: the same as the
    reference's at dp 1, or with val_batches scaled down by dp)."""
    ref_dir, want = reference
    assert "val_loss" in want[-1]  # the last step validated (MaxVio compared for every layer of every stage)
    assert_close_records(records, want, val=val)
    assert_same_model(run_dir, ref_dir)
    # Every pp rank waits for its neighbours at some point and computes at others: strictly between 0 and 1.
    assert all(len(r["pipeline_bubble_per_rank"]) == pp for r in records)
    assert all(0.0 < b < 1.0 for r in records for b in r["pipeline_bubble_per_rank"]), records
    report = [ln for ln in (run_dir / "train.log").read_text().splitlines() if ln.startswith("pipeline: ")]
    assert len(report) == 1 and "measured bubble per rank" in report[0] and "formula" in report[0], report
    measured = report[0].split("measured bubble per rank ")[1].split(" (")[0].split(", ")
    assert len(measured) == pp and all(0.0 < float(b) < 1.0 for b in measured), report


@pytest.fixture(scope="module")
def ref_no_mtp(tmp_path_factory):
    """One process, no MTP (the last stage then holds no embedding and returns one output)."""
    run = tmp_path_factory.mktemp("ref_no_mtp")
    return run, train_reference(run, *VAL, *NO_MTP)


NO_MTP = ["model.n_mtp_layers=0"]


# 1F1B: test_pp4_1f1b_matches_one_process here, and at pp 2 the loss trace of tests/test_loss_trace.py. GPipe runs
# without MTP and with the chunked loss (the last stage's one output is its loss sum).
@pytest.mark.parametrize("schedule,extra", [("GPipe", [*NO_MTP, "train.loss_chunk_tokens=40"]),
                                            ("Interleaved1F1B", []), ("DualPipeV", ["train.recompute=full"])])
def test_pp2_schedule_matches_one_process(tmp_path, request, schedule, extra):
    reference = request.getfixturevalue("ref_no_mtp" if NO_MTP[0] in extra else "ref")
    records = _train(tmp_path, 2, "parallel.pp=2", f"parallel.pp_schedule={schedule}", *extra)
    _check_pipeline_run(tmp_path, records, reference, 2)


def test_pp2_zero_bubble_with_mtp2_document_mask_and_flex_attention_matches_one_sdpa_process(tmp_path, ref_deep):
    # The stages build FlexAttention block masks from the document ids they receive; the reference runs SDPA's
    # dense document mask. One launch checks both: the ids reach every stage, and flex equals the dense mask
    # (tests/test_attention.py holds the two backends equal in one process).
    records = _train(tmp_path, 2, "parallel.pp=2", "parallel.pp_schedule=ZBVZeroBubble", "model.attn.backend=flex",
                     *DEEP)
    _check_pipeline_run(tmp_path, records, ref_deep, 2)
    assert "attention: flex (FlexAttention" in (tmp_path / "train.log").read_text()


def test_pp4_1f1b_matches_one_process(tmp_path, ref):
    records = _train(tmp_path, 4, "parallel.pp=4", "parallel.pp_schedule=1F1B")
    _check_pipeline_run(tmp_path, records, ref, 4)


def test_pp2_ep2_dp2_zero_bubble_matches_one_process(tmp_path, ref_deep):
    """FSDP2 inside each of the 4 stages over 2 data-parallel ranks that are also the expert-parallel group; the
    V-shaped tie of the embedding with sharded gradients; validation through sharded stages.

    The same launch runs the chunked loss (train.loss_chunk_tokens=40, which divides no micro-batch's 256 tokens):
    the last stage computes the main and both MTP heads' cross-entropy in its forward, with the head's weight
    FSDP2 gathered, under the split-backward schedule. It equals the unchunked loss within fp32 rounding (only the
    summation order differs, tests/test_loss.py), so the comparison with the unchunked references still holds;
    tests/test_loss.py checks in one process that such a stage returns no logits.
    """
    # One validation micro-batch per data-parallel rank: micro-batches 0 and 1, the reference's two (trainer.validate).
    records = train_layout(tmp_path, 4, "train.val_interval=3", "train.val_batches=1", "parallel.pp=2",
                           "parallel.ep=2", "parallel.pp_schedule=ZBVZeroBubble", "parallel.pp_layout=[1,1,1,1]",
                           "train.loss_chunk_tokens=40", *DEEP)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["loss_chunk_tokens"] == 40
    _check_pipeline_run(tmp_path, records, ref_deep, 2)
    assert all(r["routing_ranks_per_token"] >= 1.0 for r in records)


def test_checkpoints_reshard_between_pp2_dp2_and_one_process(tmp_path, ref):
    ref_dir, want = ref
    run = tmp_path / "pp2dp2"
    _check_pipeline_run(run, _train(run, 4, "parallel.pp=2"), ref, 2, val=False)
    # pp = 2 x dp = 2 -> one process, and one process -> pp = 2: step 3 continues the uninterrupted run.
    for nproc, pp, source in ((1, 1, run), (2, 2, ref_dir)):
        resumed = tmp_path / f"resumed_pp{pp}"
        step2 = source / "checkpoints" / "step_00000002"
        records = _train(resumed, nproc, f"parallel.pp={pp}", f"checkpoint.resume={step2}")
        assert "val_loss" in want[-1]
        assert_close_records(records, want[2:])
        assert_same_model(resumed, ref_dir)
        shutil.rmtree(resumed)
    # The HF export of the pp = 2 checkpoint (its embedding saved once, though two stages hold it) gives the same
    # logits as the single-process one's.
    # (`moetrain convert`'s command line: tests/test_readme.py; here its function, in this process.)
    logits = []
    for source in (run, ref_dir):
        out = tmp_path / f"hf_{source.name}"
        assert convert_main(["--to-hf", str(source / "checkpoints"), str(out)]) == 0
        model = from_hf_pretrained(out).eval()
        with torch.no_grad():
            logits.append(model(torch.arange(96).remainder(model.cfg.vocab_size).view(2, 48)))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ refusals, layout
def _refusal(*overrides, world_size=2):
    import os

    os.environ["WORLD_SIZE"] = str(world_size)
    try:
        with pytest.raises(ConfigError) as e:
            to_job_config(compose(["train.global_batch_size=16", "train.micro_batch_size=4", *overrides]))
    finally:
        os.environ.pop("WORLD_SIZE")
    return str(e.value)


def test_refusals_name_the_key_and_the_reason():
    msg = _refusal("parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B", "parallel.pp_chunks=3")
    assert "parallel.pp" in msg and "6 pipeline stages" in msg and "4 blocks" in msg
    msg = _refusal("parallel.pp=2", "train.global_batch_size=4")
    assert "train.global_batch_size" in msg and "1 micro-batch" in msg and "at least 2" in msg
    msg = _refusal("parallel.pp=2", "parallel.pp_schedule=DualPipeV", "train.global_batch_size=12")
    assert "3 micro-batch" in msg and "at least 4" in msg
    msg = _refusal("parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B", "train.global_batch_size=20")
    assert "train.global_batch_size" in msg and "5 micro-batches" in msg and "rounds" in msg
    # A batch ramp 16 -> 32 passes through 5 micro-batches (20 sequences), which Interleaved1F1B cannot run.
    msg = _refusal("parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B", "train.global_batch_size=32",
                   "train.batch_ramp_start=16", "train.batch_ramp_tokens=100000")
    assert msg.startswith("train.batch_ramp_start") and "5 micro-batches" in msg
    msg = _refusal("parallel.pp=2", "parallel.pp_schedule=DualPipeV", "train.compile=true")
    assert msg.startswith("train.compile")
    assert "skips layer(s) [2]" in _refusal("parallel.pp=2", "parallel.pp_layout=[[0,1],[3]]")
    assert "repeats layer 1" in _refusal("parallel.pp=2", "parallel.pp_layout=[[0,1],[1,2,3]]")
    assert "gives 3 blocks" in _refusal("parallel.pp=2", "parallel.pp_layout=[2,1]")
    msg = _refusal("parallel.pp=2", "parallel.pp_schedule=ZBVZeroBubble", "parallel.pp_chunks=1")
    assert "parallel.pp_chunks" in msg and "exactly 2 stages per rank" in msg
    assert "parallel.pp_schedule" in _refusal("parallel.pp=2", "parallel.pp_schedule=Zigzag")
    assert "ddp" in _refusal("parallel.pp=2", "parallel.dp_strategy=ddp")
    assert "deepspeed" in _refusal("parallel.pp=2", "parallel.dp_strategy=deepspeed", world_size=4)


def test_refused_layout_exits_2_before_any_process_group(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moetrain", "train", f"run.dir={tmp_path / 'run'}",
                           "parallel.pp=2", "parallel.pp_layout=[[0,1],[3]]"], capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "WORLD_SIZE": "2"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "parallel.pp_layout" in proc.stderr and "skips layer(s) [2]" in proc.stderr
    assert not (tmp_path / "run").exists()


def _brute_force_best(costs, n_stages):
    """The smallest possible largest stage cost over every contiguous split (independent of the DP)."""
    import itertools

    n, best = len(costs), float("inf")
    for cuts in itertools.combinations(range(1, n), n_stages - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(sum(costs[bounds[i]:bounds[i + 1]]) for i in range(n_stages)))
    return best


@pytest.mark.parametrize("preset,n_stages", [("tiny", 2), ("tiny", 4), ("proxy", 3), ("proxy", 5)])
def test_balanced_layout_is_a_contiguous_optimum(preset, n_stages):
    from moetrain.plan import pipeline_unit_costs

    cfg = to_job_config(compose([f"model={preset}"])).model
    layout = balanced_layout(cfg, n_stages, 256)
    assert [i for ids in layout for i in ids] == list(range(cfg.n_layers)) and all(layout)
    blocks, first, last = pipeline_unit_costs(cfg, 256)
    F = sum(f for f, _ in blocks) + first[0] + last[0]
    P = sum(p for _, p in blocks) + first[1] + last[1]
    cost = [f / F + p / P for f, p in blocks]
    # Fold the embedding into block 0 and the head into the last block: the same optimum, brute-forced.
    folded = [cost[0] + first[0] / F + first[1] / P, *cost[1:-1], cost[-1] + last[0] / F + last[1] / P]
    got = max(sum(folded[i] for i in ids) for ids in layout)
    assert got == pytest.approx(_brute_force_best(folded, n_stages), rel=1e-9)


def test_explicit_layouts_and_stage_placement():
    cfg = to_job_config(compose([])).model
    assert resolve_layout(cfg, 2, [3, 1], 64) == [[0, 1, 2], [3]]
    assert resolve_layout(cfg, 2, [[0], [1, 2, 3]], 64) == [[0], [1, 2, 3]]
    assert stage_ranks(2, 4, v_shaped=False) == [0, 1, 0, 1]
    assert stage_ranks(2, 4, v_shaped=True) == [0, 1, 1, 0]  # the first and last stage share rank 0
    assert SCHEDULES["1F1B"].bubble_formula(4, 8, 1)[0] == pytest.approx(3 / 11)
