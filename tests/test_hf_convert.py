"""Hugging Face conversion: export of a trained model, HF -> moetrain -> HF identity, FP8 dequantisation."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from moetrain.checkpoint.convert import load_checkpoint_model, main as convert_main  # noqa: E402
from moetrain.checkpoint.manager import resolve_checkpoint  # noqa: E402
from moetrain.config import compose, to_job_config  # noqa: E402
from moetrain.hf import SafetensorsDir, from_hf_pretrained  # noqa: E402
from moetrain.train import Trainer  # noqa: E402

SMALL = ["logging.console=false", "train.val_interval=0", "data.demo_bytes=200000", "train.seq_len=64",
         "train.global_batch_size=8", "train.micro_batch_size=4", "train.bias_update_speed=0.01"]


def _convert(*args):
    """``moetrain convert ARGS``, its function in this process (the command line itself: tests/test_readme.py and
    tests/test_bad_input_checkpoint.py)."""
    assert convert_main(list(args)) == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained")
    trainer = Trainer(to_job_config(compose([f"run.dir={run}", "train.steps=6", *SMALL])))
    trainer.resume_or_init()
    trainer.fit()
    return run


def test_export_trained_model_gives_same_logits_in_transformers(trained, tmp_path):
    _convert("--to-hf", str(trained / "checkpoints"), str(tmp_path / "hf"))
    ours = load_checkpoint_model(resolve_checkpoint(trained / "checkpoints"))
    biases = [m.expert_bias for m in ours.modules() if hasattr(m, "expert_bias")]
    assert any(b.abs().sum() > 0 for b in biases)  # trained biases, not zeros
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 48))
    with torch.no_grad():
        ref, got = hf(tokens).logits, ours(tokens)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    L = ours.cfg.n_layers
    assert f"model.layers.{L}.eh_proj.weight" in index["weight_map"]  # MTP after the main layers
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in index["weight_map"]


def test_hf_to_moetrain_to_hf_is_identical(trained, tmp_path):
    _convert("--to-hf", str(trained / "checkpoints"), str(tmp_path / "hf1"))
    _convert("--from-hf", str(tmp_path / "hf1"), str(tmp_path / "ckpt"))
    _convert("--to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf2"))
    a, b = SafetensorsDir(tmp_path / "hf1"), SafetensorsDir(tmp_path / "hf2")
    assert a.weight_map.keys() == b.weight_map.keys()
    for name in a.weight_map:
        ta, tb = a.get(name), b.get(name)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), name


def _quantize_fp8_blockwise(w: torch.Tensor, block: int = 128):
    """DeepSeek's released layout: fp8 e4m3 weight plus one fp32 scale_inv per 128x128 block."""
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    scale_inv = torch.empty(nr, nc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(nr):
        for j in range(nc):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = blk.abs().max().clamp_min(1e-12) / 448.0  # E4M3's largest finite value
            scale_inv[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale_inv


def test_fp8_release_layout_dequantises_to_bf16(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=160, intermediate_size=200, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, n_shared_experts=1, n_routed_experts=4, kv_lora_rank=32, q_lora_rank=None,
        qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, n_group=1, topk_group=1, num_experts_per_tok=2,
        first_k_dense_replace=1, num_mtp_layers=0)
    hf = transformers.DeepseekV3ForCausalLM(cfg)
    hf.save_pretrained(tmp_path / "src")
    weights = load_file(tmp_path / "src" / "model.safetensors")
    expected = {}
    for name in list(weights):
        w = weights[name]
        if w.ndim == 2 and name.endswith("proj.weight"):  # linear layers are FP8 in the release
            q, s = _quantize_fp8_blockwise(w)
            weights[name], weights[name.removesuffix(".weight") + ".weight_scale_inv"] = q, s
            expected[name] = q.float() * s.repeat_interleave(128, 0)[:w.shape[0]].repeat_interleave(128, 1)[:, :w.shape[1]]
    save_file(weights, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    assert any(n.endswith("kv_b_proj.weight") for n in expected) and any(".experts." in n for n in expected)

    _convert("--from-hf", str(tmp_path / "src"), str(tmp_path / "ckpt"))
    _convert("--to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out"))
    out = SafetensorsDir(tmp_path / "out")
    for name, ref in expected.items():
        got = out.get(name)
        assert got.dtype == torch.bfloat16, name
        torch.testing.assert_close(got.float(), ref, rtol=2 ** -8, atol=0, msg=name)  # bf16 rounding


def test_init_from_hf_starts_a_run_from_hf_weights(trained, tmp_path):
    _convert("--to-hf", str(trained / "checkpoints"), str(tmp_path / "hf"))
    trainer = Trainer(to_job_config(compose([f"run.dir={tmp_path / 'run'}", f"checkpoint.init_from_hf={tmp_path / 'hf'}",
                                             "train.steps=1", *SMALL])))
    trainer.resume_or_init()
    ref = from_hf_pretrained(tmp_path / "hf").state_dict()
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    bad = Trainer(to_job_config(compose([f"run.dir={tmp_path / 'bad'}", f"checkpoint.init_from_hf={tmp_path / 'hf'}",
                                         "model.dim=96", *SMALL])))
    with pytest.raises(ValueError, match="model.dim"):
        bad.resume_or_init()
