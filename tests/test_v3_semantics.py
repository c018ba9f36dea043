"""MTP hand-off and the sequence-wise balance loss against references written here (float64, plain torch).

Every model has random RMSNorm weights (with weights of 1 the pre-norm and post-norm MTP variants coincide, since
hnorm is scale-invariant), router biases large enough to change the choice, and group-limited routing. Each test
also shows that the superseded variant (pre-norm MTP inputs; f_i from the biased, group-limited choice) misses the
reference by a clear margin, so it cannot pass either way.
"""

import pytest
import torch

from conftest import make_model, small_config
from moetrain.model import IGNORE_INDEX
from moetrain.model.balance import pop_balance_loss
from moetrain.model.layers import RMSNorm
from moetrain.model.router import Router

MATCH = 1e-5  # relative: norms and the gate run in fp32 inside the float64 model
MISS = 100 * MATCH  # relative gap the superseded variants must show


def _model(depth: int, alpha: float = 0.0):
    cfg = small_config(n_group=4, topk_group=2, topk=2, balance_loss_alpha=alpha)
    cfg.n_mtp_layers = depth
    m = make_model(cfg, seed=1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, RMSNorm):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen, dtype=torch.float64) + 0.5)
            if isinstance(mod, Router):  # spread scores (as after training), and biases that change the choice
                mod.weight.mul_(10.0)
                mod.expert_bias.copy_(torch.randn(mod.expert_bias.shape, generator=gen) * 0.3)
    return cfg, m


def _rms(x, w, eps):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _ce_sum(logits_BTV, labels_BT):
    logp = torch.log_softmax(logits_BTV, dim=-1)
    keep = labels_BT != IGNORE_INDEX
    return -logp[keep].gather(-1, labels_BT[keep].unsqueeze(-1)).sum()


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_takes_normed_main_state_and_hands_on_normed_state(depth):
    cfg, m = _model(depth)
    m.eval()
    B, T, eps = 2, 16, cfg.norm_eps
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(3))
    labels = tokens.roll(-1, 1)
    captured = []
    m.layers[str(cfg.n_layers - 1)].register_forward_hook(lambda mod, inp, out: captured.append(out))
    for mod in m.mtp.values():
        mod.register_forward_hook(lambda mod, inp, out: captured.append(out))
    with torch.no_grad():
        out = m(tokens, labels)
        h_last, h_mtp = captured[0], captured[1:]  # the main stack's output before the final norm; h_1..h_D
        freqs_cis = m.freqs_cis[:T]
        head_W = m.head.weight

        def mtp_forward(first_normed: bool, hand_on_normed: bool):
            """(h_k after module k's norm, loss sum of depth k) for k = 1..D."""
            h = _rms(h_last, m.norm.weight, eps) if first_normed else h_last
            states, losses = [], []
            for k in range(1, depth + 1):
                mod = m.mtp[str(k - 1)]
                emb = m.embed.weight[tokens.roll(-k, 1)]
                x = torch.cat([_rms(emb, mod.enorm.weight, eps), _rms(h, mod.hnorm.weight, eps)], -1)
                y = mod.block(x @ mod.eh_proj.weight.T, freqs_cis)  # the block itself is checked elsewhere
                y_normed = _rms(y, mod.norm.weight, eps)
                labels_k = labels.roll(-k, 1)
                labels_k[:, -k:] = IGNORE_INDEX
                losses.append(_ce_sum(y_normed @ head_W.T, labels_k))
                states.append(y_normed)
                h = y_normed if hand_on_normed else y
            return states, losses

        ref, ref_loss = mtp_forward(True, True)
        torch.testing.assert_close(out.logits, _rms(h_last, m.norm.weight, eps) @ head_W.T, rtol=MATCH, atol=1e-6)
        for k in range(depth):
            assert _relative(h_mtp[k], ref[k]) < MATCH, k
            assert _relative(out.mtp_loss_sums[k], ref_loss[k]) < MATCH, k
        # The superseded semantics (pre-norm h_0 and hand-off) miss at every depth ...
        old, _ = mtp_forward(False, False)
        for k in range(depth):
            assert _relative(old[k], ref[k]) > MISS, (k, _relative(old[k], ref[k]))
        # ... and a pre-norm hand-off alone misses from depth 2 on.
        if depth == 2:
            mixed, _ = mtp_forward(True, False)
            assert _relative(mixed[1], ref[1]) > MISS, _relative(mixed[1], ref[1])


def _reference_balance_loss(scores_BTE: torch.Tensor, chosen_BTK: torch.Tensor, alpha: float) -> float:
    """Report eqs. 17-20, per sequence with loops: f_i from the given per-token expert sets."""
    B, T, E = scores_BTE.shape
    K = chosen_BTK.shape[-1]
    total = 0.0
    for b in range(B):
        s_norm = scores_BTE[b] / scores_BTE[b].sum(-1, keepdim=True)
        for i in range(E):
            f_i = E / (K * T) * sum(int(i in chosen_BTK[b, t].tolist()) for t in range(T))
            P_i = s_norm[:, i].mean().item()
            total += alpha * f_i * P_i / B
    return total


@pytest.mark.parametrize("depth", [1, 2])
def test_balance_loss_counts_unbiased_topk_over_all_experts(depth):
    alpha = 1.0
    cfg, m = _model(depth, alpha=alpha)
    m.train()
    B, T, K = 2, 16, cfg.moe.router.topk
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(4))
    gate_in, routed = {}, {}
    for mod in m.modules():
        if isinstance(mod, Router):
            mod.register_forward_pre_hook(lambda r, args: gate_in.__setitem__(r.layer_id, args[0].detach()))
            mod.register_forward_hook(lambda r, args, out: routed.__setitem__(r.layer_id, out[0]))
    m(tokens, tokens.roll(-1, 1))
    got = pop_balance_loss(m)
    moe_layers = list(range(cfg.moe.first_k_dense_replace, cfg.n_layers + depth))
    assert list(got) == list(gate_in) == moe_layers
    for layer_id in moe_layers:
        r = next(mod for mod in m.modules() if isinstance(mod, Router) and mod.layer_id == layer_id)
        scores_BTE = torch.sigmoid(gate_in[layer_id].double() @ r.weight.double().T).view(B, T, -1)
        ref = _reference_balance_loss(scores_BTE, scores_BTE.topk(K, dim=-1).indices, alpha)
        assert abs(got[layer_id].item() - ref) < MATCH * ref, (layer_id, got[layer_id].item(), ref)
        # The biases and group limit really change the choice, and f_i from that choice misses the reference.
        chosen_BTK = routed[layer_id].view(B, T, K)
        changed = (chosen_BTK.sort(-1).values != scores_BTE.topk(K, dim=-1).indices.sort(-1).values).any(-1)
        assert changed.float().mean() > 0.2, changed.float().mean()
        old = _reference_balance_loss(scores_BTE, chosen_BTK, alpha)
        assert abs(old - ref) > MISS * ref, (layer_id, old, ref)


def test_balance_loss_metric_accumulates_over_forwards_until_read():
    cfg, m = _model(1, alpha=0.5)
    m.train()
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, cfg.vocab_size, (2, 12), generator=gen) for _ in range(2)]
    single = []
    for tokens in batches:
        m(tokens, tokens.roll(-1, 1))
        single.append(pop_balance_loss(m))
    assert pop_balance_loss(m) == {}  # read resets
    with torch.no_grad():
        m(batches[0], batches[0].roll(-1, 1))  # no backward pass, no balance loss
    assert pop_balance_loss(m) == {}
    for tokens in batches:  # two micro-batches in flight before the metric is read
        m(tokens, tokens.roll(-1, 1))
    both = pop_balance_loss(m)
    assert list(both) == [1, 2]
    for layer_id in both:
        torch.testing.assert_close(both[layer_id], single[0][layer_id] + single[1][layer_id])
        assert not torch.allclose(single[0][layer_id], single[1][layer_id])
