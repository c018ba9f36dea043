"""The native FP8 provider: DeepSeek-V3's quantisation in torch, with emulated GEMMs.

Every converted GEMM sees E4M3 operands: ``y = Q_tile(x) @ Q_block(w)^T`` in forward; in backward the output
gradient is quantised per 1 x 128 tile (along its own row, the GEMM's contraction for the input gradient) and
``dx = Q(dy) @ Q(w)``, ``dw = Q(dy)^T @ Q(x)``. The products accumulate in fp32 (here: the E4M3 values are
dequantised and multiplied in fp32, which is exact for the products and what a tensor core's fp32 accumulation
does up to summation order). Quantisers pass gradients straight through.

NOTE: DeepSeek-V3 runs the weight gradient on activations re-quantised in 128 x 1 tiles (along tokens); here it
reuses the forward's 1 x 128 tiles, so with the blockwise recipe every quantisation is per row of tokens and a
data- or expert-parallel run computes exactly what one process does (``current`` scales per local tensor).
The saved operands are the dequantised fp32 values: FP8 numerics, not FP8 memory or speed.

Recipes: ``blockwise`` (1 x 128 tiles, 128 x 128 blocks; edge tiles shorter) and ``current`` (one scale per
tensor, per expert for the stacked experts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.model.experts import GroupedExperts
from moetrain.model.layers import uninitialised
from moetrain.precision.blockwise import fake_quantize_blocks, fake_quantize_tensor, fake_quantize_tiles


class _StraightThrough(torch.autograd.Function):
    """Forward ``quantize(x)``; backward passes the gradient unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantize) -> torch.Tensor:
        return quantize(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _QuantizeGrad(torch.autograd.Function):
    """Forward identity; backward quantises the incoming gradient (the GEMM's output gradient)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, quantize) -> torch.Tensor:
        ctx.quantize = quantize
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.quantize(grad.contiguous()), None


class Quantizers:
    """The recipe's quantisers: activations and gradients per row tile, weights per block (or one scale each)."""

    def __init__(self, recipe: str = "blockwise", pow2: bool = False):
        if recipe not in ("blockwise", "current"):
            raise ValueError(f"precision.fp8.recipe: the native provider runs blockwise or current, not {recipe!r}")
        self.recipe, self.pow2 = recipe, pow2

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        if self.recipe == "current":
            return fake_quantize_tensor(x.flatten(0, -2), self.pow2).view_as(x)
        return fake_quantize_tiles(x, self.pow2)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize_tensor(w, self.pow2) if self.recipe == "current" else fake_quantize_blocks(w, self.pow2)

    def gemm_operands(self, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q(x), Q(w)) in fp32, gradients straight through."""
        return (_StraightThrough.apply(x.float(), self.activation), _StraightThrough.apply(w.float(), self.weight))

    def output(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The GEMM output in ``dtype``, its gradient quantised on the way back."""
        return _QuantizeGrad.apply(y, self.activation).to(dtype)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class FP8Linear(nn.Linear):
    """nn.Linear (same ``weight``, same shape) whose GEMMs take E4M3 operands."""

    quantizers: Quantizers

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantizers: Quantizers) -> "FP8Linear":
        new = uninitialised(cls)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias  # the same Parameters: names, shapes, init
        new.quantizers = quantizers
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _out_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xq, wq = self.quantizers.gemm_operands(x, self.weight)
            y = self.quantizers.output(F.linear(xq, wq), dtype)
        return y if self.bias is None else y + self.bias.to(dtype)


class FP8GroupedExperts(GroupedExperts):
    """GroupedExperts (same stacked w1/w3/w2) whose grouped GEMMs take E4M3 operands, each expert's weight with
    its own blocks."""

    quantizers: Quantizers

    @classmethod
    def from_experts(cls, experts: GroupedExperts, quantizers: Quantizers) -> "FP8GroupedExperts":
        new = cls.sharing(experts)
        new.quantizers = quantizers
        return new

    def grouped_mm(self, x_NI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        dtype = _out_dtype(x_NI)
        with torch.autocast(x_NI.device.type, enabled=False):
            xq, wq = self.quantizers.gemm_operands(x_NI, w_EOI)
            return self.quantizers.output(super().grouped_mm(xq, wq, counts_E), dtype)


# Kept in full precision, as in DeepSeek-V3: the embedding, the output head, the router (not a Linear) and the
# norms; the attention core has no weights.
HIGH_PRECISION = ("head",)


def convert_native(model: nn.Module, recipe: str = "blockwise", pow2: bool = False) -> None:
    """Swap every Linear but the head for :class:`FP8Linear` and every GroupedExperts for
    :class:`FP8GroupedExperts`, in place (parameters untouched, so names and shapes stay)."""
    quantizers = Quantizers(recipe, pow2)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and full.split(".")[-1] not in HIGH_PRECISION:
                setattr(module, child_name, FP8Linear.from_linear(child, quantizers))
            elif type(child) is GroupedExperts:
                setattr(module, child_name, FP8GroupedExperts.from_experts(child, quantizers))
