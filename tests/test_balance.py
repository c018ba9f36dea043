"""Aux-loss-free bias update: the formula in isolation, and a skewed router becoming balanced."""

import torch

from moetrain.model.balance import collect_expert_counts, max_violation, routers, update_expert_bias
from moetrain.model.config import RouterConfig
from moetrain.model.router import Router


class _Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Router(8, 4, RouterConfig(topk=1))
        self.b = Router(8, 4, RouterConfig(topk=1))


def test_update_formula_and_reset():
    m = _Two()
    counts = torch.tensor([[10.0, 2.0, 4.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    maxvio = update_expert_bias(m, 0.01, counts)
    assert torch.equal(m.a.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    assert torch.equal(m.b.expert_bias, torch.zeros(4))  # balanced: sign(0) = 0
    torch.testing.assert_close(maxvio, torch.tensor([(10 - 5) / 5, 0.0]))
    assert collect_expert_counts(m).sum() == 0  # counts reset


def test_skewed_router_becomes_balanced():
    torch.manual_seed(0)
    E, D = 16, 32
    r = Router(D, E, RouterConfig(topk=2, n_group=4, topk_group=2))
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
