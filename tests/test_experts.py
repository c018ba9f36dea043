"""The grouped-GEMM expert path against the per-expert loop, and the dispatcher's round trip."""

import torch

from moetrain.model.dispatch import LocalDispatcher
from moetrain.model.experts import GroupedExperts, expert_loop_mm, grouped_mm_supported


def test_grouped_mm_grads_equal_float64_loop():
    torch.manual_seed(0)
    E, D, F = 4, 16, 32
    counts = torch.tensor([5, 0, 7, 3])  # includes an expert with no tokens
    experts = GroupedExperts(E, D, F, use_grouped_mm=True)
    for w in experts.parameters():
        torch.nn.init.normal_(w, std=0.2)
    x = torch.randn(int(counts.sum()), D, requires_grad=True)
    assert grouped_mm_supported(x, experts.w1)
    y = experts(x, counts)
    g = torch.randn_like(y)
    y.backward(g)

    ref = GroupedExperts(E, D, F, use_grouped_mm=False).double()
    ref.load_state_dict({k: v.double() for k, v in experts.state_dict().items()})
    x64 = x.detach().double().requires_grad_()
    y64 = ref(x64, counts)
    y64.backward(g.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    for name in ("w1", "w2", "w3"):
        torch.testing.assert_close(getattr(experts, name).grad.double(), getattr(ref, name).grad, rtol=1e-5, atol=1e-6)


def test_loop_fallback_for_unsupported_dtype():
    w = torch.randn(2, 3, 5, dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64)
    assert not grouped_mm_supported(x, w)
    out = expert_loop_mm(x, w, torch.tensor([1, 3]))
    torch.testing.assert_close(out, torch.cat([x[:1] @ w[0].T, x[1:] @ w[1].T]))


def test_dispatch_combine_equals_dense_weighted_sum():
    torch.manual_seed(0)
    T, D, E, K = 9, 4, 5, 2
    x = torch.randn(T, D, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w = torch.rand(T, K, dtype=torch.float64)
    scale = torch.arange(1, E + 1, dtype=torch.float64)  # "expert e" multiplies by e + 1
    d = LocalDispatcher(E)
    tokens, counts, ctx = d.dispatch(x, idx, w)
    assert counts.tolist() == torch.bincount(idx.flatten(), minlength=E).tolist()
    expert_of_row = torch.repeat_interleave(torch.arange(E), counts)
    out = d.combine(tokens * scale[expert_of_row, None], ctx)
    ref = torch.stack([sum(w[t, k] * scale[idx[t, k]] * x[t] for k in range(K)) for t in range(T)])
    torch.testing.assert_close(out, ref)


def test_local_dispatcher_handles_a_rank_with_no_tokens():
    from moetrain.model.dispatch import LocalDispatcher

    dispatcher = LocalDispatcher(4)
    x_TD = torch.zeros(0, 8, requires_grad=True)
    tokens_ND, counts_E, ctx = dispatcher.dispatch(x_TD, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert tokens_ND.shape == (0, 8) and counts_E.tolist() == [0, 0, 0, 0]
    out_TD = dispatcher.combine(tokens_ND * 2, ctx)
    out_TD.sum().backward()
    assert out_TD.shape == (0, 8) and x_TD.grad.shape == (0, 8)


def test_bf16_autocast_runs_every_grouped_gemm_in_bf16():
    """precision=bf16 without FSDP: fp32 weights, fp32 residual stream; every aten._grouped_mm of forward and
    backward still takes bf16 operands (recorded below autograd, as the kernels see them)."""
    from conftest import make_model, small_config
    from moetrain._compat import TorchDispatchMode

    class Operands(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "_grouped_mm" in str(func):
                self.dtypes.append(tuple(str(a.dtype) for a in args[:2]))
            return func(*args, **(kwargs or {}))

    model = make_model(small_config())
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with Operands() as seen:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(tokens, tokens.roll(-1, 1))
        out.loss(out.n_tokens, 0.3).backward()
    assert len(seen.dtypes) >= 2 * 3 * 3  # 2 MoE layers x (w1, w3, w2) forward, and their backward
    assert set(seen.dtypes) == {("torch.bfloat16", "torch.bfloat16")}, set(seen.dtypes)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)  # fp32 masters
