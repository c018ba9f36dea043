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
