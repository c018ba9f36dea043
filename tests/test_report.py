"""``moetrain report``: the dashboard of a real tiny run, two runs overlaid, unreadable run dirs; and the per-expert
load (``expert_load``) the trainer logs for its heatmap."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import metrics_records, small_job
from moetrain.cli import main as cli_main
from moetrain.metrics import _flat, _is_matrix, _per_row
from moetrain.report import PANELS, build_figure, load_run, render
from moetrain.train import Trainer

STEPS, LOG_INTERVAL, VAL_INTERVAL = 24, 2, 5  # records at 2, 4, 5, 6, 8, 10, ...: gaps of 1 and 2 steps


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny demo run, logged every 2 steps and at each validation (every 5): its run dir and job config."""
    run_dir = tmp_path_factory.mktemp("report") / "demo"
    job = small_job(run_dir, f"train.steps={STEPS}", f"logging.interval={LOG_INTERVAL}",
                    f"train.val_interval={VAL_INTERVAL}")
    Trainer(job).fit()
    return run_dir, job


def test_expert_load_counts_every_routed_token_since_the_last_record(run):
    run_dir, job = run
    model = job.model
    n_moe = model.n_layers + model.n_mtp_layers - model.moe.first_k_dense_replace
    records, prev = metrics_records(run_dir), 0
    assert len(records) > STEPS // LOG_INTERVAL  # the validation steps log too
    for r in records:
        load = np.array(r["expert_load"])
        assert load.shape == (n_moe, model.moe.n_routed_experts) and (load >= 0).all()
        # Each token picks topk experts in every MoE layer (MTP included), every step since the last record.
        tokens = (r["step"] - prev) * r["global_batch"] * job.train.seq_len
        assert load.sum(axis=1).tolist() == [tokens * model.moe.router.topk] * n_moe, r["step"]
        if r["step"] - prev == 1:  # one step's counts: the MaxVio the balance update computed from them
            mean = load.mean(axis=1)
            assert (load.max(axis=1) - mean) / mean == pytest.approx(r["max_violation_per_layer"], abs=1e-3)
        spread = np.array([r[f"expert_bias_{k}_per_layer"] for k in ("min", "max", "std")])
        assert spread.shape == (3, n_moe) and (spread[0] <= spread[1]).all() and (spread[2] >= 0).all()
        prev = r["step"]


def test_lists_become_scalars_and_lists_of_lists_histograms_for_wandb_and_tensorboard():
    record = {"step": 3, "expert_load": [[1, 2], [3, 4]], "bubble": [0.5]}
    assert _flat({k: v for k, v in record.items() if not _is_matrix(v)}) == {"step": 3, "bubble/0": 0.5}
    assert _per_row(record) == {"expert_load/moe_layer_0": [1, 2], "expert_load/moe_layer_1": [3, 4]}


def test_report_command_writes_a_dashboard_and_html_page(run):
    run_dir, _ = run
    proc = subprocess.run([sys.executable, "-m", "moetrain", "report", str(run_dir)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from matplotlib.image import imread

    image = imread(run_dir / "report.png")
    assert image.shape[0] >= 800 and image.shape[1] >= 1200
    page = (run_dir / "report.html").read_text()
    assert "data:image/png;base64," in page
    records = metrics_records(run_dir)
    assert f"{records[-1]['loss']:.4f}" in page
    assert f"{[r for r in records if 'val_loss' in r][-1]['val_loss']:.4f}" in page


def test_every_panel_draws_its_data(run, tmp_path):
    """Each panel's axes box holds coloured pixels (curves, bands, heatmap cells), not only black text."""
    run_dir, _ = run
    out = tmp_path / "dash.png"
    boxes = render([run_dir], out)
    assert set(boxes) == set(PANELS)
    from matplotlib.image import imread

    rgb = imread(out)[..., :3]
    for name, (left, top, right, bottom) in boxes.items():
        cell = rgb[top:bottom, left:right]
        assert cell.size and cell.std() > 0.05, name
        saturation = cell.max(axis=-1) - cell.min(axis=-1)  # 0 for white, grey and black
        assert (saturation > 0.25).mean() > 0.002, name
    assert out.with_suffix(".html").exists()


def test_two_runs_overlay_with_a_legend_naming_both(run, tmp_path):
    run_dir, _ = run
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text("".join(
        json.dumps({**r, "lm_loss": r["lm_loss"] + 1.0}) + "\n" for r in metrics_records(run_dir)))
    runs = [load_run(run_dir), load_run(other)]
    runs[0].label, runs[1].label = "demo", "other"
    fig, axes = build_figure(runs)
    lm_lines = [line for line in axes["loss"].lines if line.get_gid().startswith("lm_loss|")]
    assert sorted(line.get_gid() for line in lm_lines) == ["lm_loss|demo", "lm_loss|other"]
    assert np.allclose(lm_lines[1].get_ydata() - lm_lines[0].get_ydata(), 1.0)
    assert len(axes["learning_rate"].lines) == 2
    legend = " ".join(t.get_text() for t in fig.subfigs[0].legends[0].get_texts())
    assert str(run_dir) in legend and str(other) in legend
    assert "demo" in axes["maxvio"].get_title(loc="left")  # the heatmaps show the first run and say so


def test_keys_a_run_did_not_log_leave_their_panels_saying_so(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - s}) + "\n" for s in (1, 2)))
    boxes = render([tmp_path], tmp_path / "r.png")
    assert set(boxes) == set(PANELS)
    fig, axes = build_figure([load_run(tmp_path)])
    assert [line.get_gid() for line in axes["loss"].lines] == [f"loss|{tmp_path.name}"]
    for name in PANELS[1:]:
        assert any("not logged" in t.get_text() for t in axes[name].texts), name


def test_missing_or_empty_metrics_exit_2_naming_the_file(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path / "nowhere")]) == 2
    assert str(tmp_path / "nowhere" / "metrics.jsonl") in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    assert cli_main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "metrics.jsonl") in err and "no step records" in err
    assert not (tmp_path / "report.png").exists()
