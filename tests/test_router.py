"""Router semantics against hand-computed tensors and routing invariants."""

import math

import pytest
import torch

from moetrain.model.config import RouterConfig
from moetrain.model.router import Router, sequence_balance_loss


def _router(logits_TE: torch.Tensor, **cfg) -> Router:
    """A router whose gate returns exactly ``logits_TE`` for the identity input."""
    T, E = logits_TE.shape
    r = Router(E, E, RouterConfig(**cfg), layer_id=0)
    with torch.no_grad():
        r.weight.copy_(torch.eye(E))
    return r


def test_sigmoid_topk_hand_computed():
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0]])
    r = _router(logits, topk=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    idx, w, _ = r(logits)
    s = 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(-1.0))
    assert sorted(idx[0].tolist()) == [1, 3]
    expected = {1: s[0] / sum(s) * 2.5, 3: s[1] / sum(s) * 2.5}
    for e, wt in zip(idx[0].tolist(), w[0].tolist()):
        assert wt == pytest.approx(expected[e], rel=1e-6)


def test_bias_steers_choice_but_not_weights():
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0]])
    r = _router(logits, topk=1, norm_topk_prob=False)
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    idx, w, _ = r(logits)
    assert idx.item() == 2  # chosen through the bias
    assert w.item() == pytest.approx(1 / (1 + math.exp(1.0)), rel=1e-6)  # weight from the unbiased score


def test_group_score_is_sum_of_top2_with_bias():
    # Two groups of 3. Group 0 has the single best expert (0.9) but group 1 has the larger top-2 sum.
    scores = torch.tensor([[0.9, 0.1, 0.1, 0.6, 0.6, 0.0]])
    logits = torch.log(scores / (1 - scores)).clamp(-20, 20)
    r = _router(logits, topk=2, n_group=2, topk_group=1, norm_topk_prob=False)
    idx, _, _ = r(logits)
    assert sorted(idx[0].tolist()) == [3, 4]
    # Without a selection bias the group score is the max: group 0 wins.
    r2 = _router(logits, topk=2, n_group=2, topk_group=1, norm_topk_prob=False, selection_bias=False)
    idx2, _, _ = r2(logits)
    assert set(idx2[0].tolist()) <= {0, 1, 2}


def test_at_most_topk_group_groups_used():
    torch.manual_seed(0)
    E, G, keep = 32, 8, 3
    r = Router(16, E, RouterConfig(topk=6, n_group=G, topk_group=keep), layer_id=0)
    torch.nn.init.normal_(r.weight)
    with torch.no_grad():
        r.expert_bias.normal_(0, 0.2)
    idx, w, _ = r(torch.randn(500, 16))
    groups_used = torch.stack([torch.unique(row // (E // G)).numel() * torch.ones(()) for row in idx])
    assert groups_used.max() <= keep and idx.unique(dim=1).shape[1] == 6
    assert torch.allclose(w.sum(-1), torch.ones(500))  # norm_topk_prob with routed_scaling_factor 1


def test_counts_only_in_training():
    r = Router(8, 4, RouterConfig(topk=2), layer_id=0)
    torch.nn.init.normal_(r.weight)
    r.eval()
    r(torch.randn(10, 8))
    assert r.tokens_per_expert.sum() == 0
    r.train()
    r(torch.randn(10, 8))
    assert r.tokens_per_expert.sum() == 20 and r.tokens_per_expert.dtype == torch.float32


def test_sequence_balance_loss_formula_float64():
    torch.manual_seed(0)
    B, T, E, K, alpha = 3, 7, 6, 2, 1e-2
    scores = torch.rand(B, T, E, dtype=torch.float64)
    idx = scores.topk(K, dim=-1).indices  # eq. 18: the top-K of the unbiased scores over all experts
    got = sequence_balance_loss(scores, K, alpha)
    ref = 0.0
    for b in range(B):  # the report's per-sequence definition, written out with loops
        total = 0.0
        for i in range(E):
            f_i = E / (K * T) * sum(int(i in idx[b, t].tolist()) for t in range(T))
            p_i = sum(scores[b, t, i].item() / scores[b, t].sum().item() for t in range(T)) / T
            total += f_i * p_i
        ref += alpha * total / B
    assert got.item() == pytest.approx(ref, rel=1e-12)
    # Perfect balance (token t prefers expert t, so every f_i = 1) gives alpha * sum_i P_i = alpha.
    balanced = 0.5 + 0.1 * torch.eye(4, dtype=torch.float64)[None]
    assert sequence_balance_loss(balanced, 1, 1.0).item() == pytest.approx(1.0)
