"""Model-level behaviour: presets' parameter counts, meta build + init, packing, MTP loss, side loss."""

import pytest
import torch

from conftest import make_model, small_config
from moetrain.model import ConfigError, build_model, init_weights
from moetrain.model.balance import pop_balance_loss
from moetrain.model.moe import MoE
from moetrain.model.presets import load_preset, preset_names


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_deepseek_v3_671b_parameter_counts():
    m = build_model(load_preset("deepseek_v3_671b"), "meta")
    assert all(p.is_meta for p in m.parameters())
    main, mtp = _count(m) - _count(m.mtp), _count(m.mtp)
    assert round(main / 1e9, 1) == 671.0
    assert round(mtp / 1e9, 1) == 11.6  # embedding and head shared with the main model


def test_deepseek_v2_lite_parameter_count():
    assert round(_count(build_model(load_preset("deepseek_v2_lite"), "meta")) / 1e9, 1) == 15.7


def test_every_preset_validates_and_builds():
    assert {"tiny", "deepseek_v3_671b", "deepseek_v2_lite", "deepseek_v2_236b", "proxy"} <= set(preset_names())
    for name in preset_names():
        build_model(load_preset(name), "meta")


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="model=nope"):
        load_preset("nope")


@pytest.mark.parametrize("mutate,key", [
    (lambda c: setattr(c.moe.router, "topk_group", 5), "model.moe.router.topk_group"),
    (lambda c: setattr(c.moe, "n_routed_experts", 6), "model.moe.router.n_group"),
    (lambda c: setattr(c.attn, "qk_rope_head_dim", 7), "model.attn.qk_rope_head_dim"),
    (lambda c: setattr(c.moe.router, "scoring_func", "relu"), "model.moe.router.scoring_func"),
    (lambda c: setattr(c.moe, "first_k_dense_replace", 9), "model.moe.first_k_dense_replace"),
    (lambda c: setattr(c.rope, "scaling", "ntk"), "model.rope.scaling"),
    (lambda c: setattr(c.attn, "backend", "flash"), "model.attn.backend"),
])
def test_bad_config_names_the_field(mutate, key):
    cfg = small_config()
    mutate(cfg)
    with pytest.raises(ConfigError) as e:
        build_model(cfg, "meta")
    assert e.value.key == key


def test_init_is_independent_of_build_device_and_deterministic():
    cfg = small_config()
    a = make_model(cfg, seed=3)
    b = build_model(cfg, "cpu")  # built directly, then initialised: same values as meta -> to_empty -> init
    init_weights(b, 3)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    c = make_model(cfg, seed=4)
    assert not torch.equal(a.head.weight, c.head.weight)
    # Layout independence: a "stage" that drops modules keeps the same values for what it owns.
    stage = build_model(cfg, "meta")
    stage.layers.pop("0")
    stage.embed = None
    stage.to_empty(device="cpu")
    init_weights(stage, 3)
    assert torch.equal(stage.layers["1"].attn.wkv_a.weight, a.layers["1"].attn.wkv_a.weight)
    assert a.layers["1"].ffn.gate.expert_bias.abs().sum() == 0
    assert torch.equal(a.norm.weight, torch.ones_like(a.norm.weight))


def test_document_mask_equals_separate_sequences():
    torch.manual_seed(0)
    cfg = small_config()
    m = make_model(cfg).eval()
    d1, d2 = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 7))
    packed = torch.cat([d1, d2], 1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        got = m(packed, doc_ids_BT=doc_ids, position_ids_BT=pos)
        torch.testing.assert_close(got[:, :5], m(d1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[:, 5:], m(d2), rtol=1e-5, atol=1e-5)


def test_mtp_loss_combination():
    cfg = small_config()
    m = make_model(cfg)
    tokens = torch.randint(0, 64, (2, 12))
    labels = tokens.roll(-1, 1)
    out = m(tokens, labels)
    assert len(out.mtp_loss_sums) == 1 and out.n_tokens == 24
    n = 24
    expected = out.lm_loss_sum / n + 0.3 / 1 * out.mtp_loss_sums[0] / n
    torch.testing.assert_close(out.loss(n, 0.3), expected)
    torch.testing.assert_close(out.lm_loss_sum / n,
                               torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten()))


def test_balance_loss_gradient_reaches_router_without_being_an_output():
    """The side loss adds alpha-weighted gradient to the gate; check it against autograd of the explicit sum."""
    torch.manual_seed(0)
    cfg = small_config(balance_loss_alpha=0.5)
    tokens = torch.randint(0, 64, (2, 10))
    m1, m2 = make_model(cfg), make_model(cfg)
    out1 = m1(tokens)
    out1.float().pow(2).mean().backward()
    g_with = m1.layers["1"].ffn.gate.weight.grad.clone()
    balance = pop_balance_loss(m1)
    assert list(balance) == [1] and balance[1] > 0  # the one MoE layer (no labels: no MTP forward)

    for mod in m2.modules():
        if isinstance(mod, MoE):
            mod.alpha = 0.0  # no attached loss: add the layer's balance loss explicitly instead
    from moetrain.model.router import sequence_balance_loss

    captured = []
    gate = m2.layers["1"].ffn.gate
    hook = gate.register_forward_hook(lambda mod, inp, out: captured.append(out[2]))
    out2 = m2(tokens)
    hook.remove()
    explicit = sequence_balance_loss(captured[0].view(2, 10, -1), cfg.moe.router.topk, 0.5)
    (out2.float().pow(2).mean() + explicit).backward()
    torch.testing.assert_close(g_with, gate.weight.grad, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(g_with, make_grad_without_balance(cfg, tokens))


def make_grad_without_balance(cfg, tokens):
    m = make_model(cfg)
    for mod in m.modules():
        if isinstance(mod, MoE):
            mod.alpha = 0.0
    m(tokens).float().pow(2).mean().backward()
    return m.layers["1"].ffn.gate.weight.grad


def test_model_package_uses_no_distributed_or_private_graph_apis():
    """The model knows nothing of processes: layouts live in moetrain.parallel (see DESIGN.md)."""
    import ast
    from pathlib import Path

    import moetrain.model

    files = sorted(Path(moetrain.model.__file__).parent.glob("*.py"))
    assert len(files) >= 10
    for path in files:
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            assert not any(n.startswith(("torch.distributed", "torch._C")) for n in names), (path.name, names)
        for needle in ("torch.distributed", "torch._C", "_current_graph_task_id", "DTensor"):
            assert needle not in source, (path.name, needle)
