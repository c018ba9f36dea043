"""The checked-in loss traces (tests/assets/losses/): 30 steps of loss and gradient norm of the tiny model in one
fp32 process, at ep 2 x dp 2 and at pp 2 (1F1B), each one launch here against its trace.

The traces guard the trainer's structure: a refactor that changes what a step computes (the loss scaling, the
order of the bias update and the optimizer step, what a micro-batch sees) moves them far beyond the bound, which
is the spread measured across CPU kernels and thread counts (tolerance.json, written by regenerate.py) times a
margin. The traces were made with DEFAULT kernels; a run here uses this CPU's own.
"""

import json
from pathlib import Path

import pytest

from layouts import train_layout

ASSETS = Path(__file__).parent / "assets" / "losses"
TOLERANCE = json.loads((ASSETS / "tolerance.json").read_text())


@pytest.mark.parametrize("layout", ["single_fp32", "ep2_dp2", "pp2_1f1b"])
def test_layout_reproduces_its_loss_trace(tmp_path, layout):
    golden = json.loads((ASSETS / f"{layout}.json").read_text())
    records = train_layout(tmp_path, golden["ranks"], *golden["overrides"])
    assert [r["step"] for r in records] == golden["steps"] == list(range(1, 31))
    tol = TOLERANCE["relative_tolerance"]
    for key in ("loss", "grad_norm"):
        for step, got, want in zip(golden["steps"], (r[key] for r in records), golden[key]):
            assert abs(got - want) <= tol * max(1.0, abs(want)), (layout, key, step, got, want, tol)
    assert golden["loss"][-1] < golden["loss"][0] - 1.0  # the trace covers real learning


def test_the_layouts_traces_agree_with_each_other():
    """Layouts reproduce one process (tests/test_expert_parallel.py, test_pipeline.py): so do their traces."""
    traces = {name: json.loads((ASSETS / f"{name}.json").read_text()) for name in ("single_fp32", "ep2_dp2",
                                                                                   "pp2_1f1b")}
    tol = TOLERANCE["relative_tolerance"]
    for name, t in traces.items():
        for key in ("loss", "grad_norm"):
            for got, want in zip(t[key], traces["single_fp32"][key]):
                assert abs(got - want) <= tol * max(1.0, abs(want)), (name, key, got, want)
