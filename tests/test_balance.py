"""Aux-loss-free bias update: the formula in isolation, and a skewed router becoming balanced."""

import pytest
import torch

from moetrain.model.balance import collect_expert_counts, max_violation, routers, update_expert_bias
from moetrain.model.config import RouterConfig
from moetrain.model.router import Router


class _Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Router(8, 4, RouterConfig(topk=1), layer_id=3)
        self.b = Router(8, 4, RouterConfig(topk=1), layer_id=1)


def test_update_formula_and_reset():
    m = _Two()
    counts = torch.tensor([[10.0, 2.0, 4.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    maxvio = update_expert_bias(m, 0.01, ([3, 1], counts))  # rows keyed by layer id, in any order
    assert torch.equal(m.a.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    assert torch.equal(m.b.expert_bias, torch.zeros(4))  # balanced: sign(0) = 0
    torch.testing.assert_close(maxvio, torch.tensor([(10 - 5) / 5, 0.0]))
    layer_ids, counts_LE = collect_expert_counts(m)
    assert layer_ids == [1, 3] and counts_LE.shape == (2, 4) and counts_LE.sum() == 0  # ascending ids; reset


def test_counts_must_cover_exactly_the_models_layers():
    m = _Two()
    with pytest.raises(ValueError, match="layers"):
        update_expert_bias(m, 0.01, ([3], torch.ones(1, 4)))
    with pytest.raises(ValueError, match="layers"):
        update_expert_bias(m, 0.01, ([1, 3, 5], torch.ones(3, 4)))


def test_skewed_router_becomes_balanced():
    torch.manual_seed(0)
    E, D = 16, 32
    r = Router(D, E, RouterConfig(topk=2, n_group=4, topk_group=2), layer_id=0)
    with torch.no_grad():
        torch.nn.init.normal_(r.weight, std=0.05)
        r.weight[:3] += 0.3  # three experts favoured by most tokens
    model = torch.nn.ModuleDict({"r": r})
    x = torch.randn(2048, D) + 0.5  # a shared direction makes the skew systematic
    maxvio = []
    for _ in range(300):
        r(x)
        maxvio.append(update_expert_bias(model, 0.002).item())
    assert maxvio[0] > 1.0, maxvio[0]
    assert max(maxvio[-20:]) < 0.25 * maxvio[0], (maxvio[0], maxvio[-20:])
    assert routers(model) == [r]


def test_max_violation_definition():
    assert max_violation(torch.tensor([[1.0, 1.0, 1.0, 1.0]])).item() == 0.0
    assert max_violation(torch.tensor([[4.0, 0.0, 0.0, 0.0]])).item() == 3.0


def test_a_stage_reports_and_updates_only_its_own_layers():
    from conftest import make_model, small_config

    cfg = small_config()
    cfg.n_layers, cfg.moe.first_k_dense_replace = 3, 1  # MoE layers 1, 2 and MTP layer 3
    stage = make_model(cfg)
    stage.layers.pop("1")  # a stage keeping layer 2 and the MTP module
    r2, r3 = stage.layers["2"].ffn.gate, stage.mtp["0"].block.ffn.gate
    with torch.no_grad():
        r2.tokens_per_expert.copy_(torch.arange(8.0))
        r3.tokens_per_expert.fill_(3.0)
    layer_ids, counts_LE = collect_expert_counts(stage)
    assert layer_ids == [2, 3] and torch.equal(counts_LE, torch.stack([torch.arange(8.0), torch.full((8,), 3.0)]))
    update_expert_bias(stage, 0.5, (layer_ids, counts_LE))
    assert torch.equal(r2.expert_bias, 0.5 * torch.sign(3.5 - torch.arange(8.0))) and r3.expert_bias.abs().sum() == 0
