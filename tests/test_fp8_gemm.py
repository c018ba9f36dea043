"""The native provider's FP8 GEMMs on torch's scaled kernels against its fp32 emulation: forward output and both
gradients of FP8Linear (current recipe: TensorWise, on CPU) and of the routed experts (rowwise and current: RowWise,
one scaled_mm per expert on CPU), the blockwise autograd on the emulated kernel and its kernel operands against
torch's own CUDA checks (meta device), bytes saved for backward, the precision.fp8.gemm choice and refusal; the
blockwise and grouped kernels themselves on a Hopper GPU (skipped elsewhere).

The bound of real against emulated: both multiply the same E4M3 operands (the same scales) and accumulate in fp32,
in different orders and with the scales applied at different points. Each sum is within gamma_{K+2} * sum|a_k b_k|
of the exact one (gamma_n = n u / (1 - n u), u = 2^-24: K-1 additions, the operands' dequantisation and the
product, or the two scale multiplications), so the two differ elementwise by at most 2 (K + 3) u (|A| @ |B|^T),
with A and B the dequantised operands and K the GEMM's contraction. A scale applied to the wrong row, tile or block
is off by the scales' ratio: the data below spreads scales over 2^12, far outside the bound.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config import compose, to_job_config
from moetrain.model import ConfigError
from moetrain.model.experts import GroupedExperts
from moetrain.precision import Precision
from moetrain.precision.blockwise import (dequantize_blocks, dequantize_rows, dequantize_tensor, dequantize_tiles,
                                          quantize_blocks, quantize_rows, quantize_tensor, quantize_tiles)
from moetrain.precision.native import FP8GroupedExperts, FP8Linear, Quantizers, choose_gemms
from moetrain.precision.scaled_gemm import DenseGemm, GroupedGemm, probe

U = 2.0 ** -24  # fp32 unit roundoff
BF16_ROUNDING = 2.0 ** -8  # relative, with margin: CUDA's kernels write bf16 (round to nearest: 2^-9)


def _data(*shape, seed=0):
    """Gaussians whose rows and 64-column groups differ in scale by up to 2^12 (so tiles, blocks and rows do)."""
    g = torch.Generator().manual_seed(seed)
    cols = torch.exp2(torch.randint(-6, 7, (-(-shape[-1] // 64),), generator=g).float()).repeat_interleave(64)
    rows = torch.exp2(torch.randint(-3, 4, (*shape[:-1], 1), generator=g).float())
    return torch.randn(*shape, generator=g) * rows * cols[:shape[-1]]


def _within(got, want, a_MK, b_NK, rel=0.0):
    """|got - want| <= 2 (K + 3) u (|a| @ |b|^T) (+ rel |want|), elementwise; ``want`` not all zero."""
    K = a_MK.shape[-1]
    bound = 2 * (K + 3) * U * (a_MK.abs().double() @ b_NK.abs().double().t()) + rel * want.abs().double()
    gap = (got.double() - want.double()).abs()
    assert (gap <= bound).all(), f"worst gap/bound {float((gap / bound.clamp_min(1e-300)).max()):.3g}"
    assert want.abs().sum() > 0


@pytest.mark.parametrize("pow2", [False, True])
def test_row_and_tensor_quantisation_is_within_the_e4m3_bound(pow2):
    """One scale per row (per matrix): its largest magnitude over 448 (rounded up to a power of two), every value
    within E4M3's rounding: 2^-4 relative, 2^-10 of the scale below the smallest normal (as test_precision's tiles)."""
    x = _data(3, 40, 200)
    x[0, 5] = 0.0  # an all-zero row stays zero
    for quantize, dequantize, amax in ((quantize_rows, dequantize_rows, x.abs().amax(-1)),
                                       (quantize_tensor, dequantize_tensor, x.abs().amax((-2, -1), keepdim=True))):
        q, scale = quantize(x, pow2)
        want = (amax / 448).clamp_min(1e-12 / 448)
        torch.testing.assert_close(scale, torch.exp2(torch.ceil(torch.log2(want))) if pow2 else want)
        deq = dequantize(q, scale)
        per_value = scale.unsqueeze(-1) if quantize is quantize_rows else scale
        assert ((deq - x).abs() <= torch.maximum(x.abs() * 2 ** -4, per_value * 2 ** -10) * (1 + 1e-6)).all()
    assert (dequantize_rows(*quantize_rows(x))[0, 5] == 0).all()


def _grads(module_or_fn, x, dy, *params):
    x = x.clone().requires_grad_()
    y = module_or_fn(x)
    y.backward(dy)
    return y.detach(), x.grad, *(p.grad.clone() for p in params)


def _linear_pair(gemm: DenseGemm, quantizers: Quantizers, in_features, out_features, bias=False):
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features, bias=bias)
    base.weight.data = _data(out_features, in_features, seed=1) * 0.05
    real = FP8Linear.from_linear(base, quantizers, gemm)
    emulated = FP8Linear.from_linear(nn.Linear(in_features, out_features, bias=bias), quantizers)
    emulated.weight = nn.Parameter(base.weight.detach().clone())
    if bias:
        emulated.bias = nn.Parameter(base.bias.detach().clone())
    return real, emulated


@pytest.mark.parametrize("pow2", [False, True])
def test_current_recipe_linear_on_scaled_mm_matches_the_emulation(pow2):
    """TensorWise scaled_mm (CPU's kernel) for Fprop and Dgrad, Wgrad from the saved FP8 activation: against the
    emulation (straight-through fake quantisation and fp32 F.linear), at odd sizes and a 3-D input."""
    q = Quantizers("current", pow2)
    real, emulated = _linear_pair(DenseGemm("current", pow2), q, 200, 72)
    x, dy = _data(3, 11, 200, seed=2), _data(3, 11, 72, seed=3)
    y, dx, dw = _grads(real, x, dy, real.weight)
    y_e, dx_e, dw_e = _grads(emulated, x, dy, emulated.weight)
    xq = dequantize_tensor(*quantize_tensor(x.flatten(0, 1), pow2))
    wq = dequantize_tensor(*quantize_tensor(real.weight.detach(), pow2))
    dyq = dequantize_tensor(*quantize_tensor(dy.flatten(0, 1), pow2))
    _within(y.flatten(0, 1), y_e.flatten(0, 1), xq, wq)  # Fprop: contraction K
    _within(dx.flatten(0, 1), dx_e.flatten(0, 1), dyq, wq.t())  # Dgrad: contraction N
    _within(dw, dw_e, dyq.t(), xq.t())  # Wgrad: contraction M (tokens)


def test_blockwise_autograd_on_the_emulated_kernel_matches_the_emulation():
    """The scaled path's own autograd (Dgrad on the weight's blocks transposed, output gradient per 1x128 tile along
    N, Wgrad from the saved tiles), on its emulated kernel: the blockwise emulation's numerics, so that on a GPU
    only the kernel call differs (test_blockwise_scaled_mm_matches_the_emulation_on_hopper)."""
    real, emulated = _linear_pair(DenseGemm("blockwise", emulate=True), Quantizers("blockwise"), 300, 200, bias=True)
    x, dy = _data(37, 300, seed=2), _data(37, 200, seed=3)
    y, dx, dw, db = _grads(real, x, dy, real.weight, real.bias)
    y_e, dx_e, dw_e, db_e = _grads(emulated, x, dy, emulated.weight, emulated.bias)
    xq, wq = dequantize_tiles(*quantize_tiles(x)), dequantize_blocks(*quantize_blocks(real.weight.detach()))
    dyq = dequantize_tiles(*quantize_tiles(dy))
    _within(y - real.bias.detach(), y_e - emulated.bias.detach(), xq, wq)
    _within(dx, dx_e, dyq, wq.t())
    _within(dw, dw_e, dyq.t(), xq.t())
    assert torch.equal(db, db_e)


def test_blockwise_kernel_operands_pass_torchs_cuda_checks():
    """Blockwise F.scaled_mm has no CPU kernel, but torch checks a CUDA call's operands on the meta device too
    (its meta kernel, 2.13): E4M3 row-major x column-major, 1x128 scales outer-dim-major [M, K/128], 128x128 scales
    [round_up(K/128, 4), N/128] column-major. Fprop and Dgrad (the weight's blocks transposed), with K/128 not a
    multiple of 4 too; and a wrong layout is refused, so the check is live."""
    gemm = DenseGemm("blockwise")
    for M, K, N in ((40, 640, 384), (256, 7168, 1536), (16, 128, 128)):
        assert gemm.supports(K, N, torch.device("cuda"))
        x, w, dy = (torch.empty(*s, device="meta") for s in ((M, K), (N, K), (M, N)))
        xq, x_scale = gemm.quantize_activation(x)
        wq, w_scale = gemm.quantize_weight(w)
        assert gemm.mm(xq, x_scale, wq, w_scale, torch.bfloat16).shape == (M, N)
        dyq, dy_scale = gemm.quantize_activation(dy)
        assert gemm.mm(dyq, dy_scale, wq.t(), w_scale.t(), torch.bfloat16).shape == (M, K)
    S = F.ScalingType
    with pytest.raises(RuntimeError, match="stride"):  # row-major 1x128 scales
        F.scaled_mm(xq, wq.t(), x_scale.contiguous(), S.BlockWise1x128, w_scale.t(), S.BlockWise128x128)


def test_blockwise_features_in_ragged_block_groups_only_where_the_kernel_takes_them(monkeypatch):
    """A torch whose kernel refuses 128x128 scales padded to groups of 4 blocks: features in whole groups only."""
    import moetrain.precision.scaled_gemm as scaled_gemm

    monkeypatch.setattr(scaled_gemm, "probe", lambda gemm, device, blocks=(4, 8): "refused" if blocks[0] % 4 else None)
    cuda = torch.device("cuda")  # supports() only reads the type
    assert scaled_gemm.probe_ragged_blocks(DenseGemm("current"), cuda) == DenseGemm("current")
    gemm = scaled_gemm.probe_ragged_blocks(DenseGemm("blockwise"), cuda)
    assert gemm.block_align == 512 and gemm.supports(1024, 7168, cuda) and not gemm.supports(640, 1024, cuda)
    assert DenseGemm("blockwise").supports(640, 384, cuda) and not DenseGemm("blockwise").supports(576, 512, cuda)


def _rowwise_reference(x, w_ENK, dy, counts, pow2=False):
    """The rowwise recipe written out: Fprop per token x per output channel, Dgrad per token x per input channel,
    Wgrad from the per-token operands; fp32, one expert at a time."""
    rows = counts.tolist()
    fq = lambda t: dequantize_rows(*quantize_rows(t, pow2))  # noqa: E731
    xq, dyq = fq(x).split(rows), fq(dy).split(rows)
    w_out, w_in = fq(w_ENK), fq(w_ENK.transpose(-2, -1))
    y = torch.cat([a @ w_out[e].t() for e, a in enumerate(xq)])
    dx = torch.cat([d @ w_in[e].t() for e, d in enumerate(dyq)])
    dw = torch.stack([d.t() @ a for d, a in zip(dyq, xq)])
    return (y, dx, dw), (xq, dyq, w_out, w_in)


def _expert_grads(gemm, x, w, dy, counts):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = gemm(x, w, counts, torch.float32)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("emulate", [False, True])
def test_rowwise_experts_match_their_reference(emulate):
    """The experts' rowwise recipe (F.scaled_grouped_mm's scaling), one RowWise scaled_mm per expert here, and its
    emulated kernel: against the recipe written out, with an expert without tokens and one across 128 rows."""
    counts = torch.tensor([37, 0, 129, 5])
    x, w, dy = _data(171, 72, seed=1), _data(4, 40, 72, seed=2) * 0.05, _data(171, 40, seed=3)
    y, dx, dw = _expert_grads(GroupedGemm(emulate=emulate), x, w, dy, counts)
    (y_r, dx_r, dw_r), (xq, dyq, w_out, w_in) = _rowwise_reference(x, w, dy, counts)
    starts = [0, *counts.cumsum(0).tolist()]
    for e in range(4):
        rows = slice(starts[e], starts[e + 1])
        if counts[e]:
            _within(y[rows], y_r[rows], xq[e], w_out[e])
            _within(dx[rows], dx_r[rows], dyq[e], w_in[e])
            _within(dw[e], dw_r[e], dyq[e].t(), xq[e].t())
        else:
            assert dw[e].abs().sum() == 0


def test_current_recipe_experts_on_scaled_mm_match_the_emulation():
    """One scale per tensor (per expert for the weight) written out per row: against FP8GroupedExperts' emulation."""
    counts = torch.tensor([37, 0, 129, 5])
    experts = GroupedExperts(4, 72, 40)
    real = FP8GroupedExperts.from_experts(experts, Quantizers("current"), GroupedGemm(per_tensor=True))
    emulated = FP8GroupedExperts.from_experts(experts, Quantizers("current"))
    x, w, dy = _data(171, 72, seed=1), _data(4, 40, 72, seed=2) * 0.05, _data(171, 40, seed=3)
    got, want = (_expert_grads(lambda a, b, c, _: m.grouped_mm(a, b, c), x, w, dy, counts) for m in (real, emulated))
    fq = lambda t: dequantize_tensor(*quantize_tensor(t))  # noqa: E731
    xq, dyq, wq = fq(x), fq(dy), fq(w)
    starts = [0, *counts.cumsum(0).tolist()]
    for e in (0, 2, 3):
        rows = slice(starts[e], starts[e + 1])
        _within(got[0][rows], want[0][rows], xq[rows], wq[e])
        _within(got[1][rows], want[1][rows], dyq[rows], wq[e].t())
        _within(got[2][e], want[2][e], dyq[rows].t(), xq[rows].t())


def _saved_bytes(fn, *params) -> int:
    """Bytes autograd holds for backward while ``fn()``'s graph is alive: each storage once, the storage of
    ``params`` (held anyway) not counted."""
    saved, held = {}, {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        if t.untyped_storage().data_ptr() not in held:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    assert out.requires_grad
    return sum(saved.values())


def test_scaled_gemms_save_fp8_activations_not_fp32_copies():
    """The emulation saves its fp32 dequantised operands (4 bytes an activation, and a weight copy); the scaled path
    saves the E4M3 activation (1 byte) and its scales, and re-quantises the weight Parameter in backward."""
    M, K, N = 256, 384, 256
    x = _data(M, K).requires_grad_()
    ratios = {}
    for recipe, scale_bytes in (("current", 4), ("blockwise", 4 * M * K // 128)):
        real, emulated = _linear_pair(DenseGemm(recipe, emulate=recipe == "blockwise"), Quantizers(recipe), K, N)
        emulated_bytes = _saved_bytes(lambda: emulated(x), emulated.weight)
        real_bytes = _saved_bytes(lambda: real(x), real.weight)
        assert emulated_bytes == 4 * (M * K + N * K)
        assert real_bytes == M * K + scale_bytes
        ratios[recipe] = real_bytes / emulated_bytes
    counts, experts = torch.tensor([100, 0, 156]), GroupedExperts(3, K, N)
    real = FP8GroupedExperts.from_experts(experts, Quantizers("blockwise"), GroupedGemm())
    emulated = FP8GroupedExperts.from_experts(experts, Quantizers("blockwise"))
    w = experts.w1
    w.data.normal_()
    emulated_bytes = _saved_bytes(lambda: emulated.grouped_mm(x, w, counts), w)
    real_bytes = _saved_bytes(lambda: real.grouped_mm(x, w, counts), w)
    assert emulated_bytes >= 4 * (M * K + 3 * N * K) and real_bytes == M * K + 4 * M + counts.nbytes
    ratios["experts"] = real_bytes / emulated_bytes
    # 256 x 384 activations, 256 x 384 weights (3 experts' for the grouped GEMM): ~0.13, ~0.13, ~0.06
    assert all(r < 0.15 for r in ratios.values()), ratios


def _precision(*overrides):
    job = to_job_config(compose(["precision=fp8", "precision.fp8.provider=native", *overrides]))
    return Precision(job.precision, torch.device("cpu"))


def test_gemm_choice_is_validated_refused_and_logged():
    with pytest.raises(ConfigError, match="precision.fp8.gemm: must be one of auto, emulated, scaled"):
        _precision("precision.fp8.gemm=fast")
    with pytest.raises(ConfigError, match="precision.fp8.gemm: scaled chooses the native provider's GEMMs"):
        to_job_config(compose(["precision=fp8", "precision.fp8.gemm=scaled"]))  # provider te
    # No blockwise kernel on CPU: scaled is refused with the reason and the fix; auto emulates and says why.
    with pytest.raises(ConfigError, match="precision.fp8.gemm: scaled: the dense GEMMs .* runs on CUDA only; set "
                                          "precision.fp8.gemm=auto"):
        _precision("precision.fp8.gemm=scaled")
    auto = _precision()
    assert auto.native_gemms.dense is None and auto.native_gemms.experts is None
    assert "blockwise scaled_mm (1x128 / 128x128 scales) runs on CUDA only" in auto.native_gemms.describe()
    assert str(auto).startswith("fp8 (native, blockwise, emulated GEMMs;")
    # The current recipe has CPU kernels: auto and scaled take them.
    for gemm in ("auto", "scaled"):
        p = _precision("precision.fp8.recipe=current", f"precision.fp8.gemm={gemm}")
        assert p.native_gemms.dense == DenseGemm("current") and p.native_gemms.experts == GroupedGemm(per_tensor=True)
        assert str(p).startswith("fp8 (native, current, scaled dense and experts GEMMs;")
    assert _precision("precision.fp8.recipe=current", "precision.fp8.gemm=emulated").native_gemms.dense is None


def test_a_kernel_that_fails_its_probe_is_emulated_under_auto_and_refused_under_scaled(monkeypatch):
    """A kernel whose scales land on the wrong rows (as a layout torch changed would) disagrees with the emulation."""
    import moetrain.precision.native as native

    def misplaced(self, a_q, a_scale, b_q, b_scale, *rest):  # each expert's weight scales given to another
        return GroupedGemm.mm(self, a_q, a_scale, b_q, b_scale if self.emulate else b_scale.flip(0), *rest)

    monkeypatch.setattr(native, "GroupedGemm", type("Misplaced", (GroupedGemm,), {"mm": misplaced}))
    assert probe(GroupedGemm(per_tensor=True), torch.device("cpu")) is None
    cpu = torch.device("cpu")
    auto = choose_gemms("current", False, "auto", cpu)
    assert auto.dense is not None and auto.experts is None
    assert "failed its probe against the emulation: its " in auto.describe()
    with pytest.raises(ConfigError, match="precision.fp8.gemm: scaled: the experts GEMMs .* probe"):
        choose_gemms("current", False, "scaled", cpu)


def test_a_model_on_scaled_gemms_trains_like_the_emulated_one():
    """The tiny model's loss and gradients with the current recipe on CPU's scaled kernels (every Linear and the
    experts) against the emulation: the same FP8 numerics up to summation order, which can move a value across an
    E4M3 rounding boundary downstream (one step of 2^-4), so the bound is FP8's, not fp32's."""
    from conftest import small_job
    from moetrain.model import build_model
    from moetrain.parallel.init import init_weights
    from moetrain.precision.native import convert_native

    job = small_job("/tmp/unused")
    results = []
    for gemm in ("auto", "emulated"):
        model = build_model(job.model, "meta")
        unfit = convert_native(model, "current", False, choose_gemms("current", False, gemm, torch.device("cpu")))
        scaled = [n for n, m in model.named_modules() if getattr(m, "scaled", None) is not None]
        assert not unfit and (len(scaled) > 10 if gemm == "auto" else not scaled), scaled
        model = model.to_empty(device="cpu")
        init_weights(model, 0)
        tokens = torch.randint(0, job.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
        loss = model(tokens[:, :-1], tokens[:, 1:]).loss(256, 0.3)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (loss_e, grads_e) = results
    assert abs(float(loss - loss_e)) <= 1e-4 * float(loss_e)
    gaps = {n: float((grads[n] - grads_e[n]).norm() / grads_e[n].norm()) for n in grads if grads_e[n].norm() > 0}
    assert max(gaps.values()) < 2 ** -4, max(gaps.items(), key=lambda kv: kv[1])


hopper = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0) and hasattr(F, "scaled_mm")),
    reason="blockwise scaled_mm and scaled_grouped_mm need a CUDA GPU of compute capability >= 9.0")


@hopper
@pytest.mark.parametrize("pow2", [False, True])
def test_blockwise_scaled_mm_matches_the_emulation_on_hopper(pow2):
    """BlockWise1x128 x BlockWise128x128 Fprop and Dgrad against the blockwise emulation (fp32 operands, no
    autocast): the bound above plus the kernel's bf16 output rounding; Wgrad (fp32, not the kernel) the bound."""
    cuda = torch.device("cuda")
    real, emulated = _linear_pair(DenseGemm("blockwise", pow2), Quantizers("blockwise", pow2), 512, 1024)
    real, emulated = real.to(cuda), emulated.to(cuda)
    x, dy = _data(200, 512, seed=2).to(cuda), _data(200, 1024, seed=3).to(cuda)  # 200 rows: padded to 208
    y, dx, dw = _grads(real, x, dy, real.weight)
    y_e, dx_e, dw_e = _grads(emulated, x, dy, emulated.weight)
    xq = dequantize_tiles(*quantize_tiles(x, pow2))
    wq, dyq = dequantize_blocks(*quantize_blocks(real.weight.detach(), pow2)), dequantize_tiles(*quantize_tiles(dy, pow2))
    _within(y, y_e, xq, wq, BF16_ROUNDING)
    _within(dx, dx_e, dyq, wq.t(), BF16_ROUNDING)
    _within(dw, dw_e, dyq.t(), xq.t())
    assert probe(DenseGemm("blockwise", pow2), cuda) is None
    assert probe(DenseGemm("blockwise", pow2), cuda, (3, 5)) is None  # K/128 not a multiple of 4: scales padded


@hopper
@pytest.mark.parametrize("per_tensor", [False, True])
def test_scaled_grouped_mm_matches_the_per_expert_kernels_on_hopper(per_tensor):
    """F.scaled_grouped_mm (RowWise) against the same GEMMs on the emulated kernel, an expert without tokens and
    odd counts among them; and the probe passes."""
    cuda = torch.device("cuda")
    counts = torch.tensor([37, 0, 129, 7], device=cuda)
    x, w, dy = (t.to(cuda) for t in (_data(173, 256, seed=1), _data(4, 384, 256, seed=2) * 0.05,
                                     _data(173, 384, seed=3)))
    gemm = GroupedGemm(per_tensor)
    (y, dx, dw), (y_e, dx_e, dw_e) = (_expert_grads(g, x, w, dy, counts)
                                      for g in (gemm, dataclasses.replace(gemm, emulate=True)))
    fq = gemm.quantize_rows
    xq, dyq = dequantize_rows(*fq(x)), dequantize_rows(*fq(dy))
    w_out, w_in = dequantize_rows(*fq(w)), dequantize_rows(*fq(w.transpose(-2, -1)))
    starts = [0, *counts.cumsum(0).tolist()]
    for e in (0, 2, 3):
        rows = slice(starts[e], starts[e + 1])
        _within(y[rows], y_e[rows], xq[rows], w_out[e], BF16_ROUNDING)
        _within(dx[rows], dx_e[rows], dyq[rows], w_in[e], BF16_ROUNDING)
        _within(dw[e], dw_e[e], dyq[rows].t(), xq[rows].t())
    assert probe(gemm, cuda) is None
