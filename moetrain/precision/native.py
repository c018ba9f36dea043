"""The native FP8 provider: DeepSeek-V3's quantisation in torch, its GEMMs on torch's scaled kernels or emulated.

Every converted GEMM sees E4M3 operands: ``y = Q_tile(x) @ Q_block(w)^T`` in forward; in backward the output
gradient is quantised per 1 x 128 tile (along its own row, the GEMM's contraction for the input gradient) and
``dx = Q(dy) @ Q(w)``, ``dw = Q(dy)^T @ Q(x)``. The products accumulate in fp32.

Two ways to run them (``precision.fp8.gemm``, decided once per process by :func:`choose_gemms`):

- emulated (here: :class:`Quantizers`): the E4M3 values are dequantised and multiplied in fp32, which is exact for
  the products and what a tensor core's fp32 accumulation does up to summation order; quantisers pass gradients
  straight through, and the saved operands are the dequantised fp32 values (FP8 numerics, not FP8 memory or
  speed). It runs anywhere and is the reference the scaled kernels are tested against.
- scaled (:mod:`moetrain.precision.scaled_gemm`): forward and input-gradient GEMMs on ``F.scaled_mm`` with the
  same scales, the routed experts on ``F.scaled_grouped_mm`` with per-row scales (rowwise, its only FP8 scaling);
  FP8 activations saved for backward. A GEMM whose shapes the kernel cannot take stays emulated, and the log says so.

NOTE: DeepSeek-V3 runs the weight gradient on activations re-quantised in 128 x 1 tiles (along tokens); here it
reuses the forward's 1 x 128 tiles, so with the blockwise recipe every quantisation is per row of tokens and a
data- or expert-parallel run computes exactly what one process does (``current`` scales per local tensor).

Recipes: ``blockwise`` (1 x 128 tiles, 128 x 128 blocks; edge tiles shorter) and ``current`` (one scale per
tensor, per expert for the stacked experts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.model.config import ConfigError
from moetrain.model.experts import GroupedExperts
from moetrain.model.layers import uninitialised
from moetrain.precision.blockwise import FP8_BLOCK, fake_quantize_blocks, fake_quantize_tensor, fake_quantize_tiles
from moetrain.precision.scaled_gemm import (DenseGemm, GroupedGemm, dense_unavailable, grouped_unavailable, probe,
                                            probe_ragged_blocks)


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
    """nn.Linear (same ``weight``, same shape) whose GEMMs take E4M3 operands: on ``scaled``'s kernel, or emulated
    by ``quantizers`` where it is None."""

    quantizers: Quantizers
    scaled: DenseGemm | None

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantizers: Quantizers, scaled: DenseGemm | None = None) -> "FP8Linear":
        new = uninitialised(cls)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias  # the same Parameters: names, shapes, init
        new.quantizers, new.scaled = quantizers, scaled
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _out_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            if self.scaled is not None:
                y = self.scaled(x.flatten(0, -2), self.weight, dtype).unflatten(0, x.shape[:-1])
            else:
                xq, wq = self.quantizers.gemm_operands(x, self.weight)
                y = self.quantizers.output(F.linear(xq, wq), dtype)
        return y if self.bias is None else y + self.bias.to(dtype)


class FP8GroupedExperts(GroupedExperts):
    """GroupedExperts (same stacked w1/w3/w2) whose grouped GEMMs take E4M3 operands: on ``scaled``'s kernel (one
    scale per row), or emulated by ``quantizers`` (each expert's weight with its own blocks) where it is None."""

    quantizers: Quantizers
    scaled: GroupedGemm | None

    @classmethod
    def from_experts(cls, experts: GroupedExperts, quantizers: Quantizers,
                     scaled: GroupedGemm | None = None) -> "FP8GroupedExperts":
        new = cls.sharing(experts)
        new.quantizers, new.scaled = quantizers, scaled
        return new

    def grouped_mm(self, x_NI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        dtype = _out_dtype(x_NI)
        with torch.autocast(x_NI.device.type, enabled=False):
            if self.scaled is not None:
                return self.scaled(x_NI, w_EOI, counts_E, dtype)
            xq, wq = self.quantizers.gemm_operands(x_NI, w_EOI)
            return self.quantizers.output(super().grouped_mm(xq, wq, counts_E), dtype)


@dataclass
class NativeGemms:
    """The kernel each kind of GEMM runs on (None: emulated), with the reason a kind is emulated."""

    dense: DenseGemm | None = None
    experts: GroupedGemm | None = None
    why_emulated: dict[str, str] = field(default_factory=dict)  # kind (dense, experts): reason
    device_type: str = "cpu"

    def describe(self) -> str:
        """One line for the log: which path each kind of GEMM took."""
        if self.dense is None:
            dense = f"dense GEMMs emulated in fp32 ({self.why_emulated['dense']})"
        else:
            dense = f"dense GEMMs on scaled_mm ({self.dense.recipe}"
            if self.dense.recipe == "blockwise" and self.dense.block_align > FP8_BLOCK:
                dense += (f"; features in multiples of {self.dense.block_align} only: the kernel failed its probe "
                          "with 128x128 scales padded to groups of 4 blocks")
            dense += ")"
        if self.experts is None:
            return f"{dense}; routed experts emulated in fp32 ({self.why_emulated['experts']})"
        kernel = "scaled_grouped_mm" if self.device_type == "cuda" else "scaled_mm per expert"
        experts = f"routed experts on {kernel} ({self.experts.recipe}"
        if self.experts.recipe == "rowwise":
            experts += (": the grouped kernel scales per row only, so the experts take per-token and "
                        "per-output-channel scales, not 1x128 tiles and 128x128 blocks")
        return f"{dense}; {experts})"


def choose_gemms(recipe: str, pow2: bool, gemm: str, device: torch.device) -> NativeGemms:
    """``precision.fp8.gemm`` on ``device``: ``emulated``; ``scaled`` (refused, with the reason, where a kernel is
    missing or fails its probe); ``auto`` (the kernels that are there and pass their probe, emulation elsewhere)."""
    if gemm == "emulated":
        reason = "precision.fp8.gemm=emulated"
        return NativeGemms(why_emulated={"dense": reason, "experts": reason}, device_type=device.type)
    kernels = {"dense": DenseGemm(recipe, pow2), "experts": GroupedGemm(per_tensor=recipe == "current", pow2=pow2)}
    why = {"dense": dense_unavailable(recipe, device), "experts": grouped_unavailable(device)}
    if gemm == "auto" and recipe == "blockwise" and why["dense"] and not why["experts"]:
        # The experts' rowwise scales stand in for blockwise only beside real blockwise dense GEMMs: where those are
        # emulated, the experts are too, in the recipe asked for.
        why["experts"] = "kept in the blockwise recipe, as the dense GEMMs are emulated"
    for kind, kernel in kernels.items():
        if why[kind] is None:
            failed = probe(kernel, device)
            why[kind] = failed and f"the kernel failed its probe against the emulation: {failed}"
    if why["dense"] is None:
        kernels["dense"] = probe_ragged_blocks(kernels["dense"], device)
    if gemm == "scaled" and (why["dense"] or why["experts"]):
        kind = "dense" if why["dense"] else "experts"
        raise ConfigError("precision.fp8.gemm", f"scaled: the {kind} GEMMs cannot run on scaled kernels here: "
                                                f"{why[kind]}; set precision.fp8.gemm=auto (emulated where they "
                                                "cannot) or emulated")
    return NativeGemms(*(None if why[k] else kernels[k] for k in ("dense", "experts")),
                       {k: v for k, v in why.items() if v}, device.type)


# Kept in full precision, as in DeepSeek-V3: the embedding, the output head, the router (not a Linear) and the
# norms; the attention core has no weights.
HIGH_PRECISION = ("head",)


def convert_native(model: nn.Module, recipe: str = "blockwise", pow2: bool = False, gemms: NativeGemms | None = None,
                   device: torch.device | None = None) -> list[str]:
    """Swap every Linear but the head for :class:`FP8Linear` and every GroupedExperts for
    :class:`FP8GroupedExperts`, in place (parameters untouched, so names and shapes stay), their GEMMs on
    ``gemms``' kernels (all emulated without). Returns the modules that stay emulated, their shapes not the
    kernel's on ``device`` (the device the model will run on)."""
    quantizers, gemms, device = Quantizers(recipe, pow2), gemms or NativeGemms(), device or torch.device("cpu")
    unfit = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and full.split(".")[-1] not in HIGH_PRECISION:
                scaled = gemms.dense
                if scaled is not None and not scaled.supports(child.in_features, child.out_features, device):
                    scaled = None
                    unfit.append(full)
                setattr(module, child_name, FP8Linear.from_linear(child, quantizers, scaled))
            elif type(child) is GroupedExperts:
                scaled = gemms.experts
                if scaled is not None and not scaled.supports(*child.w2.shape[1:], device):
                    scaled = None
                    unfit.append(full)
                setattr(module, child_name, FP8GroupedExperts.from_experts(child, quantizers, scaled))
    return unfit
