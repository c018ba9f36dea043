"""The native provider's FP8 GEMMs on torch's scaled-matmul kernels (``precision.fp8.gemm``).

DeepSeek-V3 runs three GEMMs per linear layer in FP8 (report, Figure 6): Fprop ``y = x w^T``, Dgrad ``dx = dy w``
and Wgrad ``dw = dy^T x``. Here Fprop and Dgrad run on ``F.scaled_mm`` (``F.scaled_grouped_mm`` for the routed
experts) with E4M3 operands and exactly the emulation's scales (:mod:`moetrain.precision.blockwise`), accumulating
in fp32. Wgrad contracts over tokens, along which the activations' scales vary (1 x 128 tiles, or one per token),
so it is no single scaled GEMM: it multiplies the saved FP8 operands dequantised, in the layer's output dtype (fp32:
the emulation's numerics; bf16 under autocast: each dequantised value and the product rounded to 8 bits, far below
E4M3's 2^-4). NOTE: DeepSeek-V3 re-quantises the activations along tokens (128 x 1 tiles) to run Wgrad in FP8 too.

Saved for backward: the FP8 activation and its scales (1 byte an element against the emulation's 4) and the weight
Parameter itself, re-quantised in backward to the forward's very values rather than held as a copy per micro-batch.

Scalings, per recipe:

- dense ``blockwise``: activations and output gradients per 1 x 128 tile (``BlockWise1x128``), weights per
  128 x 128 block (``BlockWise128x128``, the same blocks transposed for Dgrad). CUDA, compute capability >= 9.0,
  in and out features multiples of 128.
- dense ``current``: one scale per tensor (``TensorWise``). CPU; CUDA >= 8.9 with features multiples of 16.
- experts ``rowwise``: ``F.scaled_grouped_mm`` takes ``RowWise`` scales only, so with ``blockwise`` asked for the
  routed experts quantise per token (activations, output gradients) and per output channel (the weight in Fprop;
  per input channel in Dgrad, where the input is the kernel's output dimension): a recipe of its own. Experts with
  ``current``: one scale per tensor (per expert for the weight) written out per row. CUDA >= 9.0 with features
  multiples of 16; off CUDA one ``F.scaled_mm`` (RowWise) per expert, which is how CPU tests the same numerics.

Every recipe has an emulated kernel beside the real one (dequantise, multiply in fp32): the reference the real one
is tested against, and probed against on the device before training (:func:`probe`).

Shapes: M rows (tokens), K the Fprop contraction (in features), N out features, E experts; G = ceil(K / 128).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from moetrain._compat import compile_disabled
from moetrain.model.experts import expert_loop_mm
from moetrain.precision.blockwise import (FP8_BLOCK, dequantize_blocks, dequantize_rows, dequantize_tensor,
                                          dequantize_tiles, quantize_blocks, quantize_rows, quantize_tensor,
                                          quantize_tiles)

# cuBLAS and CUTLASS FP8 GEMMs want 16-byte aligned rows of E4M3 (torch's scaled_mm checks K and N % 16).
_ALIGN = 16
# Blockwise takes whole 128-blocks; torch 2.13 reads the 128x128 scales' contraction (K/128) padded to a multiple of
# 4. NOTE: older versions may want it unpadded: where the probe finds so, features in whole groups of four blocks
# (which need no padding: all of DeepSeek-V3's but wkv_a's 576 outputs) are the only ones taken.
_BLOCK_GROUP = 4
# Real against emulated in the probe: identical E4M3 operands, so only fp32 summation order and the bf16 output
# rounding (2^-9 relative, and Wgrad's bf16 operands) differ; a scale applied to the wrong tile, block or row errs
# by the ratio of two scales, which the probe's data spreads over 2^18.
_PROBE_TOLERANCE = 1e-2


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def dense_unavailable(recipe: str, device: torch.device) -> str | None:
    """Why FP8Linear's recipe has no scaled_mm kernel on ``device`` (or None)."""
    if not hasattr(F, "scaled_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.scaled_mm"
    if recipe == "blockwise":
        if device.type != "cuda":
            return "blockwise scaled_mm (1x128 / 128x128 scales) runs on CUDA only"
        if _capability(device) < (9, 0):
            return f"blockwise scaled_mm needs compute capability >= 9.0, this GPU is {_capability(device)}"
        return None
    if device.type == "cuda" and _capability(device) < (8, 9):
        return f"FP8 scaled_mm needs compute capability >= 8.9, this GPU is {_capability(device)}"
    return None if device.type in ("cpu", "cuda") else f"no FP8 scaled_mm kernel known on {device.type}"


def grouped_unavailable(device: torch.device) -> str | None:
    """Why the routed experts have no scaled GEMM on ``device`` (or None)."""
    if device.type != "cuda":
        return None if hasattr(F, "scaled_mm") and device.type == "cpu" else f"no FP8 scaled_mm on {device.type}"
    if not hasattr(F, "scaled_grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.scaled_grouped_mm"
    if _capability(device) < (9, 0):
        return f"scaled_grouped_mm needs compute capability >= 9.0, this GPU is {_capability(device)}"
    return None


def probe_ragged_blocks(gemm: DenseGemm, device: torch.device) -> DenseGemm:
    """``gemm`` (which passed :func:`probe`), taking features in 128-blocks not grouped by 4 only where the kernel
    computes them right with their scales padded (3 and 5 blocks)."""
    if gemm.recipe != "blockwise" or probe(gemm, device, (3, 5)) is None:
        return gemm
    return replace(gemm, block_align=_BLOCK_GROUP * FP8_BLOCK)


def _scaling():
    return F.ScalingType  # exists where scaled_mm does


@dataclass(frozen=True)
class DenseGemm:
    """FP8Linear's GEMMs: ``recipe`` blockwise or current, on the scaled_mm kernel or (``emulate``) in fp32."""

    recipe: str = "blockwise"
    pow2: bool = False
    emulate: bool = False
    block_align: int = FP8_BLOCK  # blockwise: features a multiple of this (_BLOCK_GROUP blocks where padding fails)

    @property
    def align(self) -> int:
        return self.block_align if self.recipe == "blockwise" else _ALIGN

    def supports(self, in_features: int, out_features: int, device: torch.device) -> bool:
        """Whether the kernel takes a Linear of these features on ``device`` (both are K or N of some GEMM)."""
        if self.emulate or device.type != "cuda":
            return True
        return in_features % self.align == 0 and out_features % self.align == 0

    def quantize_activation(self, x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Along the last dim, the contraction of the GEMM it enters (Fprop for x, Dgrad for dy)."""
        return quantize_tiles(x_MK, self.pow2) if self.recipe == "blockwise" else quantize_tensor(x_MK, self.pow2)

    def dequantize_activation(self, q_MK: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return dequantize_tiles(q_MK, scale) if self.recipe == "blockwise" else dequantize_tensor(q_MK, scale)

    def quantize_weight(self, w_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_blocks(w_NK, self.pow2) if self.recipe == "blockwise" else quantize_tensor(w_NK, self.pow2)

    def mm(self, a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
           out_dtype: torch.dtype) -> torch.Tensor:
        """``a @ b^T`` of a_MK (activation scales) and b_NK (weight scales), in ``out_dtype``."""
        if self.emulate:
            dequantize = dequantize_blocks if self.recipe == "blockwise" else dequantize_tensor
            return F.linear(self.dequantize_activation(a_q, a_scale), dequantize(b_q, b_scale)).to(out_dtype)
        S = _scaling()
        if self.recipe == "blockwise":
            a_q, a_scale, pad = _pad_rows(a_q, a_scale)
            a_scale = a_scale.t().contiguous().t()  # [M, G], "outer-dim-major": stride (1, M)
            # [round_up(G, 4), N / 128], column-major: the kernel reads G rounded up to 4 (the padding unread)
            G = b_scale.shape[1]
            b_scale = F.pad(b_scale, (0, -G % _BLOCK_GROUP), value=1.0).contiguous().t()
            kinds = S.BlockWise1x128, S.BlockWise128x128
        else:
            pad, kinds = 0, (S.TensorWise, S.TensorWise)
        y = F.scaled_mm(a_q, b_q.contiguous().t(), a_scale, kinds[0], b_scale, kinds[1],
                        output_dtype=_kernel_dtype(a_q, out_dtype))
        return (y[:y.shape[0] - pad] if pad else y).to(out_dtype)

    @compile_disabled  # NOTE: see GroupedGemm.__call__
    def __call__(self, x_MK: torch.Tensor, w_NK: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return _DenseFP8.apply(x_MK, w_NK, self, out_dtype)


def _kernel_dtype(q: torch.Tensor, out_dtype: torch.dtype) -> torch.dtype:
    # NOTE: on CUDA bf16, which every FP8 kernel writes (the grouped and rowwise ones nothing else); CPU's write either.
    return torch.bfloat16 if q.device.type == "cuda" else out_dtype


def _pad_rows(q_MK: torch.Tensor, scale_MG: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows up to a multiple of 16 on CUDA (zero rows: exact, and cut from the output). NOTE: conservative; torch
    documents no row alignment for the 1x128 scales, whose columns start every M elements."""
    pad = -q_MK.shape[0] % _ALIGN if q_MK.device.type == "cuda" else 0
    if not pad:
        return q_MK, scale_MG, 0
    return (torch.cat([q_MK, q_MK.new_zeros(pad, q_MK.shape[1])]),
            torch.cat([scale_MG, scale_MG.new_ones(pad, scale_MG.shape[1])]), pad)


class _DenseFP8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MK, w_NK, gemm: DenseGemm, out_dtype):
        xq_MK, x_scale = gemm.quantize_activation(x_MK)
        y_MN = gemm.mm(xq_MK, x_scale, *gemm.quantize_weight(w_NK), out_dtype)
        ctx.save_for_backward(xq_MK, x_scale, w_NK)
        ctx.gemm, ctx.out_dtype, ctx.x_dtype = gemm, out_dtype, x_MK.dtype
        return y_MN

    @staticmethod
    def backward(ctx, dy_MN):
        xq_MK, x_scale, w_NK = ctx.saved_tensors
        gemm, dtype = ctx.gemm, ctx.out_dtype
        dyq_MN, dy_scale = gemm.quantize_activation(dy_MN)  # along N, Dgrad's contraction
        dx_MK = dw_NK = None
        if ctx.needs_input_grad[0]:
            wq_NK, w_scale = gemm.quantize_weight(w_NK)  # the forward's values again
            # w^T's blocks are w's blocks transposed (a tensor scale is its own transpose)
            dx_MK = gemm.mm(dyq_MN, dy_scale, wq_NK.t(), w_scale.t(), dtype).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dy = gemm.dequantize_activation(dyq_MN, dy_scale).to(dtype)
            dw_NK = (dy.t() @ gemm.dequantize_activation(xq_MK, x_scale).to(dtype)).to(w_NK.dtype)
        return dx_MK, dw_NK, None, None


@dataclass(frozen=True)
class GroupedGemm:
    """The routed experts' GEMMs with one scale per row of each operand (``RowWise``): per token and per output
    channel, or (``per_tensor``, the current recipe) one per tensor written out per row; on
    ``F.scaled_grouped_mm`` (CUDA), one ``F.scaled_mm`` per expert elsewhere, or (``emulate``) in fp32."""

    per_tensor: bool = False
    pow2: bool = False
    emulate: bool = False

    @property
    def recipe(self) -> str:
        return "current" if self.per_tensor else "rowwise"

    align = _ALIGN

    def supports(self, dim: int, inter_dim: int, device: torch.device) -> bool:
        return self.emulate or device.type != "cuda" or (dim % _ALIGN == 0 and inter_dim % _ALIGN == 0)

    def quantize_rows(self, x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_MK, scale_M) for activations and gradients; (q_ENK, scale_EN) for a stack of expert weights."""
        if not self.per_tensor:
            return quantize_rows(x_MK, self.pow2)
        q, scale = quantize_tensor(x_MK, self.pow2)
        return q, scale.squeeze(-1).expand(x_MK.shape[:-1]).contiguous()

    def mm(self, a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
           counts_E: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """Per expert e: its rows of a_MK times b_ENK[e]^T, in ``out_dtype``."""
        if self.emulate:
            return expert_loop_mm(dequantize_rows(a_q, a_scale), dequantize_rows(b_q, b_scale), counts_E).to(out_dtype)
        S = _scaling()
        b_KN = b_q.contiguous().transpose(-2, -1)  # the kernels' column-major right operand
        if a_q.device.type == "cuda":
            offs = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
            y = F.scaled_grouped_mm(a_q, b_KN, a_scale, S.RowWise, b_scale, S.RowWise, offs=offs,
                                    output_dtype=torch.bfloat16)
            return y.to(out_dtype)
        rows = counts_E.tolist()  # one host read for both splits
        outs = [F.scaled_mm(a, b_KN[e], s.unsqueeze(-1), S.RowWise, b_scale[e].unsqueeze(0), S.RowWise,
                            output_dtype=out_dtype)
                for e, (a, s) in enumerate(zip(a_q.split(rows), a_scale.split(rows)))]
        return torch.cat(outs) if outs else a_q.new_empty(0, b_q.shape[1], dtype=out_dtype)

    # NOTE: run eagerly inside compiled blocks (train.compile): scaled_grouped_mm has no fake kernel (torch 2.13)
    # and these autograd Functions were never traced on a GPU.
    @compile_disabled
    def __call__(self, x_MK: torch.Tensor, w_ENK: torch.Tensor, counts_E: torch.Tensor,
                 out_dtype: torch.dtype) -> torch.Tensor:
        return _GroupedFP8.apply(x_MK, w_ENK, counts_E, self, out_dtype)


class _GroupedFP8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MK, w_ENK, counts_E, gemm: GroupedGemm, out_dtype):
        xq_MK, x_scale_M = gemm.quantize_rows(x_MK)
        y_MN = gemm.mm(xq_MK, x_scale_M, *gemm.quantize_rows(w_ENK), counts_E, out_dtype)  # per output channel
        ctx.save_for_backward(xq_MK, x_scale_M, w_ENK, counts_E)
        ctx.gemm, ctx.out_dtype, ctx.x_dtype = gemm, out_dtype, x_MK.dtype
        return y_MN

    @staticmethod
    def backward(ctx, dy_MN):
        xq_MK, x_scale_M, w_ENK, counts_E = ctx.saved_tensors
        gemm, dtype = ctx.gemm, ctx.out_dtype
        dyq_MN, dy_scale_M = gemm.quantize_rows(dy_MN)  # per token, along Dgrad's contraction N
        dx_MK = dw_ENK = None
        if ctx.needs_input_grad[0]:
            # Dgrad contracts over N: the weight's scales must be constant along it, so one per input channel
            wq_EKN, w_scale_EK = gemm.quantize_rows(w_ENK.transpose(-2, -1))
            dx_MK = gemm.mm(dyq_MN, dy_scale_M, wq_EKN, w_scale_EK, counts_E, dtype).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dy_MN = dequantize_rows(dyq_MN, dy_scale_M).to(dtype)
            x_MK = dequantize_rows(xq_MK, x_scale_M).to(dtype)
            # TODO: one grouped GEMM (torch._grouped_mm's 2d x 2d form, bf16 on CUDA) without this host read, once
            # checked on a GPU
            rows = counts_E.tolist()
            dw_ENK = torch.stack([dy.t() @ x for dy, x in zip(dy_MN.split(rows), x_MK.split(rows))]).to(w_ENK.dtype)
        return dx_MK, dw_ENK, None, None, None


def _probe_data(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussians whose rows, and 128 x 128 blocks, differ in scale (by up to 2^6 and 2^12)."""
    blocks = torch.exp2(torch.randint(-6, 7, [-(-n // FP8_BLOCK) for n in shape], generator=generator).float())
    for dim in range(len(shape)):
        blocks = blocks.repeat_interleave(FP8_BLOCK, dim=dim).narrow(dim, 0, shape[dim])
    rows = torch.exp2(torch.randint(-3, 4, (*shape[:-1], 1), generator=generator).float())
    return torch.randn(*shape, generator=generator) * blocks * rows


def _relative_gap(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))


def probe(gemm: DenseGemm | GroupedGemm, device: torch.device, blocks: tuple[int, int] = (4, 8)) -> str | None:
    """Why ``gemm``'s kernel cannot stand in for its emulation on ``device`` (None if it can): one small GEMM of
    ``blocks`` (in, out) 128-blocks at odd row counts, forward and both gradients, against the emulated kernel on
    the same operands. A kernel that raises or disagrees (a scale layout other than the one this torch was checked
    with) is caught here, before training, rather than trained with."""
    g = torch.Generator().manual_seed(0)
    M, K, N = 40, blocks[0] * FP8_BLOCK, blocks[1] * FP8_BLOCK
    x, dy = _probe_data(M, K, generator=g), _probe_data(M, N, generator=g)
    grouped = isinstance(gemm, GroupedGemm)
    w = _probe_data(3, N, K, generator=g) if grouped else _probe_data(N, K, generator=g)
    counts = torch.tensor([13, 0, M - 13], device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def run(g_: DenseGemm | GroupedGemm) -> list[torch.Tensor]:
        x_, w_ = x.to(device).requires_grad_(), w.to(device).requires_grad_()
        y = g_(x_, w_, counts, dtype) if grouped else g_(x_, w_, dtype)
        y.backward(dy.to(device, dtype))
        return [y.detach(), x_.grad, w_.grad]

    try:
        got, want = run(gemm), run(replace(gemm, emulate=True))
    except Exception as e:  # noqa: BLE001  (the kernel's refusal, whatever its type, is the answer)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    gaps = {name: _relative_gap(a, b) for name, a, b in zip(("Fprop", "Dgrad", "Wgrad"), got, want)}
    worst = max(gaps, key=gaps.get)
    if not gaps[worst] <= _PROBE_TOLERANCE:
        return f"its {worst} differs from the emulated GEMM's by {gaps[worst]:.1e} (relative; at most " \
               f"{_PROBE_TOLERANCE:g} expected)"
    return None
