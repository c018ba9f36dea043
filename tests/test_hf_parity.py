"""Logits of moetrain's import of a saved Hugging Face model equal transformers' own (fp32, CPU)."""


import pytest
import torch

transformers = pytest.importorskip("transformers")

from moetrain.hf import from_hf_pretrained  # noqa: E402

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=16, qk_rope_head_dim=8,
            v_head_dim=12, qk_nope_head_dim=8, num_experts_per_tok=2, max_position_embeddings=64,
            initializer_range=0.1, num_mtp_layers=0)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8}

V3_CASES = {
    "sigmoid-qlora-groups-yarn": dict(q_lora_rank=12, n_group=4, topk_group=2, first_k_dense_replace=1,
                                      norm_topk_prob=True, routed_scaling_factor=2.5, rope_parameters=YARN),
    "sigmoid-noq-1group-nonorm": dict(q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=0,
                                      norm_topk_prob=False, routed_scaling_factor=1.0),
    "sigmoid-noq-2of2groups-2dense": dict(q_lora_rank=None, n_group=2, topk_group=2, first_k_dense_replace=2,
                                          norm_topk_prob=True, routed_scaling_factor=1.5),
    "sigmoid-qlora-1of4groups-yarn-default-mscale": dict(
        q_lora_rank=12, n_group=4, topk_group=1, first_k_dense_replace=0, norm_topk_prob=True,
        routed_scaling_factor=1.0, rope_parameters={**YARN, "mscale": 0.0, "mscale_all_dim": 0.0}),
}
V2_CASES = {
    "softmax-greedy": dict(q_lora_rank=None, topk_method="greedy", first_k_dense_replace=1),
    "softmax-group-limited-yarn": dict(q_lora_rank=12, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                       first_k_dense_replace=0, routed_scaling_factor=2.0, rope_parameters=YARN),
}


def _save(tmp_path, model):
    model.save_pretrained(tmp_path)
    return tmp_path


def _assert_logits_match(hf_model, path):
    ours = from_hf_pretrained(path)
    tokens = torch.randint(0, BASE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(tokens).logits
        got = ours(tokens)
    rel = (got - ref).abs().max() / ref.abs().max()
    assert rel < 1e-5, f"max relative logit error {rel:.2e}"


@pytest.mark.parametrize("case", sorted(V3_CASES))
def test_deepseek_v3_logits_match(tmp_path, case):
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(**BASE, **V3_CASES[case])
    hf_model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-zero selection biases, large enough to change which experts are chosen
        for layer in hf_model.model.layers[cfg.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.3)
    _assert_logits_match(hf_model, _save(tmp_path, hf_model))


@pytest.mark.parametrize("case", sorted(V2_CASES))
def test_deepseek_v2_softmax_logits_match(tmp_path, case):
    torch.manual_seed(0)
    cfg = transformers.DeepseekV2Config(**BASE, **V2_CASES[case])
    hf_model = transformers.DeepseekV2ForCausalLM(cfg).eval()
    _assert_logits_match(hf_model, _save(tmp_path, hf_model))


def test_bias_changes_choice_not_weights(tmp_path):
    """Guard against a vacuous parity: the biases used above really change the logits."""
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(**BASE, **V3_CASES["sigmoid-noq-1group-nonorm"])
    hf_model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    ours = from_hf_pretrained(_save(tmp_path, hf_model))
    tokens = torch.randint(0, BASE["vocab_size"], (1, 20))
    with torch.no_grad():
        before = ours(tokens)
        for m in ours.modules():
            if hasattr(m, "expert_bias"):
                m.expert_bias.normal_(0, 0.3)
        assert not torch.allclose(before, ours(tokens))


def test_mtp_layers_after_main_layers_are_imported(tmp_path):
    """DeepSeek's layout stores MTP module k as layer n_layers + k; check it against HF's own decoder layer.

    h_0 is the main model's state after its final norm; every norm weight differs from 1, since with unit weights
    the pre-norm variant gives the same result (hnorm is scale-invariant).
    """
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(**{**BASE, "num_mtp_layers": 1}, **V3_CASES["sigmoid-noq-1group-nonorm"])
    hf_model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        hf_model.model.norm.weight.uniform_(0.5, 1.5)
    hf_model.save_pretrained(tmp_path)
    L, D = cfg.num_hidden_layers, cfg.hidden_size
    # The MTP block: an HF decoder layer with index L, plus enorm/hnorm/eh_proj/shared_head.norm.
    mtp_layer = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3DecoderLayer(cfg, L).eval()
    with torch.no_grad():  # a bare layer is not initialised by transformers (its experts are torch.empty)
        for p in mtp_layer.parameters():
            p.normal_(0, 0.1) if p.ndim >= 2 else p.uniform_(0.5, 1.5)
        mtp_layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    extra = {f"model.layers.{L}.{k}": v.clone() for k, v in mtp_layer.state_dict().items()}
    extra.update({f"model.layers.{L}.enorm.weight": torch.rand(D) + 0.5, f"model.layers.{L}.hnorm.weight": torch.rand(D) + 0.5,
                  f"model.layers.{L}.shared_head.norm.weight": torch.rand(D) + 0.5,
                  f"model.layers.{L}.eh_proj.weight": torch.randn(D, 2 * D) * 0.1,
                  f"model.layers.{L}.embed_tokens.weight": hf_model.model.embed_tokens.weight.detach().clone(),
                  f"model.layers.{L}.shared_head.head.weight": hf_model.lm_head.weight.detach().clone()})
    weights = load_file(tmp_path / "model.safetensors")
    weights.update(extra)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})

    ours = from_hf_pretrained(tmp_path)
    assert ours.cfg.n_mtp_layers == 1
    tokens = torch.randint(0, cfg.vocab_size, (1, 24))
    labels = tokens.roll(-1, 1)
    with torch.no_grad():
        out = ours(tokens, labels)
        # Independent reference for depth 1, built from transformers' modules and the raw tensors.
        hm = hf_model.model
        h = hm.embed_tokens(tokens)
        pos = torch.arange(tokens.shape[1])[None]
        pe = hm.rotary_emb(h, pos)
        mask = torch.ones(24, 24, dtype=torch.bool).tril()[None, None]
        for layer in hm.layers:
            h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos)
        rms = lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))  # noqa: E731
        emb = hm.embed_tokens(tokens.roll(-1, 1))
        labels_1 = labels.roll(-1, 1)

        def depth_1_loss(h_0):
            x = torch.cat([rms(emb, extra[f"model.layers.{L}.enorm.weight"]),
                           rms(h_0, extra[f"model.layers.{L}.hnorm.weight"])], -1)
            x = x @ extra[f"model.layers.{L}.eh_proj.weight"].T
            x = mtp_layer(x, attention_mask=mask, position_embeddings=pe, position_ids=pos)
            logits = hf_model.lm_head(rms(x, extra[f"model.layers.{L}.shared_head.norm.weight"]))
            return torch.nn.functional.cross_entropy(logits[0, :-1], labels_1[0, :-1], reduction="sum")

        ref = depth_1_loss(rms(h, hm.norm.weight))
        pre_norm = depth_1_loss(h)  # the superseded semantics
    torch.testing.assert_close(out.mtp_loss_sums[0], ref, rtol=1e-5, atol=1e-5)
    assert (pre_norm - ref).abs() > 100 * 1e-5 * ref.abs(), (pre_norm, ref)
