"""The all-to-all dispatcher on 2 and 4 gloo ranks against LocalDispatcher + all experts in one process.

Every rank draws the same seeded global batch, runs its own slice of tokens through the expert-parallel path
with the expert block it holds, and checks outputs and gradients (x, gate weights, expert weights) against the
single-process reference computed on the concatenation of every rank's tokens.
"""

from __future__ import annotations

import datetime
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moetrain.model.config import RouterConfig
from moetrain.model.dispatch import LocalDispatcher
from moetrain.model.experts import GroupedExperts
from moetrain.model.router import Router
from moetrain.parallel.expert_parallel import AllToAllDispatcher, routing_ranks_per_token

D, F = 8, 12


def _cases(ep: int) -> list[dict]:
    """Each case: tokens per rank, routing kind, padding, capacity; E = 2 experts per rank unless stated."""
    E = 2 * ep
    last = [E - 1, E - 2]  # the two experts of the last rank
    cases = [
        dict(name="random", E=E, K=2, T=[5 + 3 * r for r in range(ep)], route="random"),
        dict(name="random_k3_E3_per_rank", E=3 * ep, K=3, T=[11] * ep, route="random"),
        dict(name="skewed_one_expert", E=E, K=2, T=[7] * ep, route=("fixed", [1, 1])),
        # every copy goes to the last rank: the other ranks receive nothing
        dict(name="one_rank_receives_all", E=E, K=2, T=[6] * ep, route=("fixed", last)),
        dict(name="expert_without_tokens", E=E, K=2, T=[9] * ep, route=("exclude", 2)),
        dict(name="rank_sends_nothing", E=E, K=2, T=[0] + [8] * (ep - 1), route="random"),
        dict(name="pad8", E=E, K=2, T=[5 + 2 * r for r in range(ep)], route="random", pad_to=8),
        dict(name="pad8_empty_rank_and_expert", E=E, K=2, T=[7] * (ep - 1) + [0], route=("exclude", 0), pad_to=8),
        dict(name="capacity", E=E, K=2, T=[16] * ep, route="zipf", capacity_factor=1.0),
        dict(name="capacity_pad4", E=E, K=2, T=[12, 3] * (ep // 2), route="zipf", capacity_factor=1.5, pad_to=4),
        # fp32 through torch._grouped_mm (D, F 16-byte aligned), whose backward needs contiguous gradients
        dict(name="fp32_grouped_mm_pad8", E=E, K=2, T=[10] * ep, route="random", pad_to=8, dtype=torch.float32,
             D=16, F=32),
    ]
    for i, case in enumerate(cases):
        case["seed"] = 100 * ep + i
    return cases


def _routing(case: dict, T: int, g: torch.Generator) -> torch.Tensor:
    E, K, route = case["E"], case["K"], case["route"]
    if isinstance(route, tuple) and route[0] == "fixed":
        return torch.tensor(route[1]).expand(T, K).clone()
    logits_TE = torch.rand(T, E, generator=g, dtype=torch.float64)
    if route == "zipf":  # overloads the first experts so that capacity drops copies
        logits_TE = logits_TE / torch.arange(1, E + 1, dtype=torch.float64)
    if isinstance(route, tuple) and route[0] == "exclude":
        logits_TE[:, route[1]] = -1.0
    return logits_TE.topk(K, dim=1).indices


def _kept_TK(idx_TK: torch.Tensor, E: int, capacity_factor: float | None) -> torch.Tensor:
    """Brute force: per expert, the first ceil(cf * T*K / E) copies in (token, k) order are kept."""
    T, K = idx_TK.shape
    if capacity_factor is None:
        return torch.ones(T, K, dtype=torch.bool)
    cap, seen, kept = math.ceil(capacity_factor * T * K / E), [0] * E, torch.zeros(T, K, dtype=torch.bool)
    for t in range(T):
        for k in range(K):
            e = int(idx_TK[t, k])
            kept[t, k] = seen[e] < cap
            seen[e] += 1
    return kept


def _global_data(case: dict):
    g = torch.Generator().manual_seed(case["seed"])
    dtype, d, f = case.get("dtype", torch.float64), case.get("D", D), case.get("F", F)
    x, idx, w, kept = [], [], [], []
    for T in case["T"]:
        x.append(torch.randn(T, d, generator=g, dtype=torch.float64).to(dtype))
        idx.append(_routing(case, T, g))
        w.append(torch.rand(T, case["K"], generator=g, dtype=torch.float64).to(dtype))
        kept.append(_kept_TK(idx[-1], case["E"], case.get("capacity_factor")))
    experts = GroupedExperts(case["E"], d, f, use_grouped_mm=True).to(dtype)
    for p in experts.parameters():
        p.data = (torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    grad_out = [torch.randn(T, d, generator=g, dtype=torch.float64).to(dtype) for T in case["T"]]
    return x, idx, w, kept, experts, grad_out


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _run_case(case: dict, rank: int, ep: int, group) -> None:
    x, idx, w, kept, ref_experts, grad_out = _global_data(case)
    E, L = case["E"], case["E"] // ep
    dtype = case.get("dtype", torch.float64)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)

    # Reference: one process, all tokens, all experts; a dropped copy is a copy with gate weight 0 (a constant).
    x_ref, w_ref = _leaf(torch.cat(x)), _leaf(torch.cat(w))
    local = LocalDispatcher(E)
    tokens, counts, ctx = local.dispatch(x_ref, torch.cat(idx), w_ref * torch.cat(kept))
    out_ref = local.combine(ref_experts(tokens, counts), ctx)
    out_ref.backward(torch.cat(grad_out))

    # This rank: its own tokens, its block of experts.
    experts = GroupedExperts(L, x[0].shape[1], ref_experts.w1.shape[1], use_grouped_mm=True).to(dtype)
    for name, p in experts.named_parameters():
        p.data = getattr(ref_experts, name).detach()[rank * L:(rank + 1) * L].clone()
    disp = AllToAllDispatcher(E, group, pad_to=case.get("pad_to", 1), capacity_factor=case.get("capacity_factor"))
    x_r, w_r = _leaf(x[rank]), _leaf(w[rank])
    tokens, counts_L, ctx = disp.dispatch(x_r, idx[rank], w_r)
    out = disp.combine(experts(tokens, counts_L), ctx)
    out.backward(grad_out[rank])

    msg = f"case {case['name']}, ep={ep}, rank={rank}"
    rows = slice(sum(case["T"][:rank]), sum(case["T"][:rank + 1]))
    torch.testing.assert_close(out, out_ref[rows], **tol, msg=msg)
    torch.testing.assert_close(x_r.grad, x_ref.grad[rows], **tol, msg=msg)
    torch.testing.assert_close(w_r.grad, w_ref.grad[rows], **tol, msg=msg)
    for name, p in experts.named_parameters():
        torch.testing.assert_close(p.grad, getattr(ref_experts, name).grad[rank * L:(rank + 1) * L], **tol,
                                   msg=f"{msg}, {name}")

    # Counts: every kept copy of this rank's experts from all ranks, padded to the alignment.
    n_kept_E = torch.bincount(torch.cat(idx)[torch.cat(kept)], minlength=E)[rank * L:(rank + 1) * L]
    pad = case.get("pad_to", 1)
    assert counts_L.tolist() == [(int(c) + pad - 1) // pad * pad for c in n_kept_E], msg
    assert tokens.shape[0] == int(counts_L.sum()), msg
    n_copies = kept[rank].numel()
    expected_dropped = (n_copies - int(kept[rank].sum())) / n_copies if n_copies else 0.0
    assert disp.last_dropped_fraction == pytest.approx(expected_dropped), msg


def _worker(rank: int, ep: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ep,
                            timeout=datetime.timedelta(seconds=60))
    try:
        group = dist.new_group(list(range(ep)))  # a subgroup, as the mesh hands out, not the default group
        for case in _cases(ep):
            _run_case(case, rank, ep, group)
        dist.barrier()  # neither rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("ep", [2, 4])
def test_all_to_all_dispatch_equals_local_dispatch(ep, tmp_path):
    mp.spawn(_worker, args=(ep, str(tmp_path / "init")), nprocs=ep, join=True)


def test_capacity_cases_drop_copies():
    """The capacity cases above must really drop copies on some rank, or they would not test dropping."""
    for ep in (2, 4):
        for case in _cases(ep):
            if case.get("capacity_factor"):
                kept = _global_data(case)[3]
                assert any(not bool(k.all()) for k in kept), case["name"]


def test_routing_ranks_per_token_matches_brute_force_and_group_limit():
    torch.manual_seed(0)
    E, ep, T = 16, 4, 64
    idx_TK = torch.rand(T, E).topk(6, dim=1).indices
    brute = sum(len({int(e) // (E // ep) for e in row}) for row in idx_TK) / T
    assert routing_ranks_per_token(idx_TK, E, ep).item() == pytest.approx(brute)
    assert routing_ranks_per_token(torch.tensor([[0, 1], [0, 15]]), E, ep).item() == 1.5

    # Group-limited routing with n_group = ep: a token reaches at most topk_group ranks.
    router = Router(32, E, RouterConfig(topk=6, n_group=ep, topk_group=2), layer_id=0)
    torch.nn.init.normal_(router.weight)
    router.expert_bias.normal_()
    idx_TK = router(torch.randn(256, 32))[0]
    per_token = [len({int(e) // (E // ep) for e in row}) for row in idx_TK]
    assert max(per_token) == 2
    assert routing_ranks_per_token(idx_TK, E, ep).item() == pytest.approx(sum(per_token) / len(per_token))
    assert routing_ranks_per_token(idx_TK, E, ep).item() <= 2
