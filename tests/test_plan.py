"""FLOP and active-parameter counts against the numbers DeepSeek reports."""

import pytest

from moetrain.model.presets import load_preset
from moetrain.plan import active_matmul_params, peak_tflops, training_flops_per_token


def test_deepseek_v3_activates_37b_parameters():
    cfg = load_preset("deepseek_v3_671b")
    matmul = active_matmul_params(cfg, with_mtp=False)
    with_embedding = matmul + cfg.vocab_size * cfg.dim
    assert 36.5e9 < matmul < with_embedding < 37.7e9  # the V3 report: 37B activated per token


def test_deepseek_v2_lite_activates_2_4b_parameters():
    assert active_matmul_params(load_preset("deepseek_v2_lite"), with_mtp=False) == pytest.approx(2.4e9, rel=0.03)


def test_deepseek_v3_training_flops_per_token():
    # DeepSeek reports about 250 GFLOPs per training token for V3 at sequence length 4096.
    cfg = load_preset("deepseek_v3_671b")
    cfg.n_mtp_layers = 0
    assert training_flops_per_token(cfg, 4096) == pytest.approx(250e9, rel=0.05)


def test_peak_table_matches_device_names():
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA GB200") == 2500.0 and peak_tflops("NVIDIA B200") == 2250.0
    assert peak_tflops("cpu") is None


# ------------------------------------------------------------------------------------------ moetrain plan
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from moetrain.model import build_model  # noqa: E402
from moetrain.plan import parameter_counts  # noqa: E402

NODE_BATCH = ["train.seq_len=4096", "train.global_batch_size=64", "train.micro_batch_size=1"]


def _plan(*overrides: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "moetrain", "plan", "--json", *overrides], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("name", ["tiny", "proxy_1gpu", "proxy", "deepseek_v2_lite", "deepseek_v3_671b"])
def test_parameter_counts_equal_the_built_model(name):
    cfg = load_preset(name)
    named = dict(build_model(cfg, "meta").named_parameters())
    counts = parameter_counts(cfg)
    assert counts["total"] == sum(p.numel() for n, p in named.items() if not n.startswith("mtp."))
    assert counts["mtp"] == sum(p.numel() for n, p in named.items() if n.startswith("mtp."))
    assert counts["routed"] == sum(p.numel() for n, p in named.items() if ".experts." in n and not n.startswith("mtp."))


def test_plan_reproduces_the_deepseek_v3_report():
    plan = _plan("model=deepseek_v3_671b", "plan=deepseek_v3_report")
    m, b = plan["model"], plan["budget"]
    assert round(m["params_total"] / 1e9, 1) == 671.0 and round(m["params_mtp"] / 1e9, 1) == 11.6
    assert m["params_active"] == pytest.approx(37e9, rel=0.02)
    # 180K GPU-hours per trillion tokens x 14.8T + 119K + 5K = 2.788M GPU-hours, at $2: $5.576M.
    assert b["total_gpu_hours"] == pytest.approx(2.788e6, rel=1e-9) and b["cost"] == pytest.approx(5.576e6, rel=1e-9)
    # With it come the report's layout (pp 16, ep 64 over 8 nodes, 2048 GPUs) and the V3 recipe, fitting 80 GB.
    lay, mem = plan["layout"], plan["memory_gb"]
    assert (lay["gpus"], lay["pp"], lay["ep"], lay["dp"], lay["gpu"]) == (2048, 16, 64, 128, "H800")
    assert mem["gpu"] == 80 and mem["fits"] and len(mem["per_pp_rank"]) == 16
    assert plan["speed"]["mfu"] == pytest.approx(0.4, abs=0.05)  # the rate DeepSeek measured, as MFU on H800


def test_deepseek_v2_lite_counts():
    counts = parameter_counts(load_preset("deepseek_v2_lite"))
    assert round(counts["total"] / 1e9, 1) == 15.7 and counts["mtp"] == 0
    assert counts["active"] == pytest.approx(2.4e9, rel=0.03)


@pytest.mark.parametrize("model", ["proxy", "deepseek_v2_lite"])
def test_one_node_preset_fits_an_80gb_gpu(model):
    plan = _plan(f"model={model}", "parallel=node8", *NODE_BATCH)
    assert (plan["layout"]["gpus"], plan["layout"]["ep"]) == (8, 8)
    assert plan["memory_gb"]["gpu"] == 80 and plan["memory_gb"]["fits"]
    parts = plan["memory_gb"]
    per_mb = parts["activations_per_microbatch"]  # recompute none, one micro-batch in flight without a pipeline
    assert per_mb["none"] == pytest.approx(parts["activations"]) and per_mb["full"] < per_mb["selective"] < per_mb["none"]
    assert parts["total"] == pytest.approx(sum(parts[k] for k in ("weights", "gradients", "optimizer", "activations",
                                                                  "recompute_working", "all_to_all_buffers",
                                                                  "reserved")))


SINGLE_GPU = ["model=proxy_1gpu", "data=synthetic", "train.seq_len=4096", "train.global_batch_size=16",
              "train.micro_batch_size=2"]  # README's one-GPU line and benchmarks/gpu.sh's benchmark


def test_single_gpu_preset_fits_one_h100_with_fp32_master_weights_and_adam():
    plan = _plan(*SINGLE_GPU)
    lay, mem = plan["layout"], plan["memory_gb"]
    assert (lay["gpus"], lay["pp"], lay["dp"], lay["ep"], lay["gpu"]) == (1, 1, 1, 1, "H100")
    assert mem["gpu"] == 80 and mem["fits"] and mem["total"] <= 0.9 * 80  # a tenth left for the allocator
    # One rank shards nothing: fp32 master weights, fp32 gradients and both fp32 Adam moments (16 bytes per
    # parameter) are all there, next to activations without recomputation.
    n = parameter_counts(load_preset("proxy_1gpu"))
    assert mem["gradients"] + mem["optimizer"] >= 12 * (n["total"] + n["mtp"]) / 1e9
    assert plan["layout"]["recompute"] == "none"
    # The 7B proxy does not fit one GPU: it stays the 8-GPU example.
    assert not _plan("model=proxy", *SINGLE_GPU[1:])["memory_gb"]["fits"]


def test_a_layout_that_does_not_fit_gets_the_nearest_that_does():
    base = ["model=deepseek_v3_671b", "plan=deepseek_v3_report", "train.recompute=selective"]
    plan = _plan(*base)
    assert not plan["memory_gb"]["fits"]
    suggestion = plan["suggestion"]["overrides"]
    assert suggestion and any(" ".join(suggestion) in w for w in plan["warnings"])
    again = _plan(*base, *suggestion)
    assert again["memory_gb"]["fits"]
    assert again["memory_gb"]["total"] == pytest.approx(plan["suggestion"]["total_gb"])


def test_more_memory_per_layout_change_goes_the_expected_way():
    from moetrain.config import compose, to_job_config
    from moetrain.planner import make_plan

    def total(*overrides):
        job = to_job_config(compose(["model=proxy", "train.seq_len=1024", "train.global_batch_size=8",
                                     "train.micro_batch_size=2", "train.steps=10", *overrides]))
        return make_plan(job, 1)["memory_gb"]

    none, full = total("train.recompute=none"), total("train.recompute=full")
    # (the logits of the head and MTP head, 129K wide, stay: full recomputation covers blocks)
    assert full["activations"] < none["activations"] / 2 and full["recompute_working"] > none["recompute_working"]
    # ddp keeps fp32 weights, gradients and Adam moments: 16 bytes per parameter, nothing sharded on one rank.
    ddp = total("parallel.dp_strategy=ddp")
    n = parameter_counts(load_preset("proxy"))
    assert ddp["weights"] + ddp["gradients"] + ddp["optimizer"] == pytest.approx(16 * (n["total"] + n["mtp"]) / 1e9)


def test_plan_counts_the_chunked_loss():
    from moetrain.config import compose, to_job_config
    from moetrain.planner import make_plan, render_table

    def plan(*overrides):
        job = to_job_config(compose(["model=proxy", "train.seq_len=4096", "train.global_batch_size=8",
                                     "train.micro_batch_size=1", "train.steps=10", "precision=bf16", *overrides]))
        return make_plan(job, 1)

    full, chunked = plan(), plan("train.loss_chunk_tokens=1000")
    cfg = load_preset("proxy")
    N, C, V, D, a = 4096, 1000, cfg.vocab_size, cfg.dim, 2
    # Kept: the main head's bf16 logits and fp32 log-softmax and the MTP head's log-softmax, for a log-sum-exp
    # per token and head. Working: the fp32 gradient of N tokens' logits, for one chunk's logits in bf16 and
    # fp32, with h's fp32 gradient and bf16 copy. At least (N - C) x V x 6 bytes less: 7.5 GB at V = 129K.
    kept = N * ((a + 4) * V + 4 * V * cfg.n_mtp_layers) - N * 4 * (1 + cfg.n_mtp_layers)
    working = N * 4 * V - (C * V * (a + 4) + N * D * (4 + a))
    saved = full["memory_gb"]["total"] - chunked["memory_gb"]["total"]
    assert saved * 1e9 == pytest.approx(kept + working, rel=1e-6)
    assert saved * 1e9 >= (N - C) * V * (a + 4)
    assert "loss in chunks of 1000 tokens" in render_table({**chunked, "warnings": []})


def test_plan_counts_the_chunked_loss_on_the_last_pipeline_stage():
    """Under pp the last stage returns the loss sums instead of every depth's logits, which the schedule kept."""
    from moetrain.config import compose, to_job_config
    from moetrain.planner import plan_ranks

    def ranks(*overrides):
        job = to_job_config(compose(["model=proxy", "train.seq_len=4096", "train.global_batch_size=8",
                                     "train.micro_batch_size=1", "train.steps=10", "precision=bf16", "parallel.pp=2",
                                     *overrides]), 2)
        return plan_ranks(job, 2)

    full, chunked = ranks(), ranks("train.loss_chunk_tokens=1000")
    cfg = load_preset("proxy")
    N, C, V, D, a, heads = 4096, 1000, cfg.vocab_size, cfg.dim, 2, 1 + cfg.n_mtp_layers
    assert chunked[0].total == full[0].total  # the first stage holds no head
    assert chunked[1].last and chunked[1].in_flight == full[1].in_flight == 1  # 1F1B: the last stage holds one
    # Kept per micro-batch in flight: every head's bf16 logits and fp32 log-softmax, for one log-sum-exp per
    # token and head. Working: as on one process (the fp32 gradient of N tokens' logits, for one chunk's).
    kept = N * heads * ((a + 4) * V - 4)
    working = N * 4 * V - (C * V * (a + 4) + N * D * (4 + a))
    assert full[1].total - chunked[1].total == pytest.approx(kept + working, rel=1e-6)


def test_unknown_gpu_is_refused_naming_the_key():
    proc = subprocess.run([sys.executable, "-m", "moetrain", "plan", "plan.gpu=TPUv9"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "plan.gpu_memory_gb" in proc.stderr
