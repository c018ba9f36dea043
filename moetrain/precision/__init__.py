"""Precision: the compute dtype, the FP8 form of a model, and the autocast context the forward runs in.

``precision.dtype``: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32``, ``bf16`` or ``fp8``: FP8 GEMMs for the
attention projections, dense and shared-expert MLPs, MTP projections and routed experts, with ``precision.fp8``'s
provider (``te``: Transformer Engine; ``native``: :mod:`moetrain.precision.native`, its GEMMs on torch's scaled
kernels or emulated, ``precision.fp8.gemm``) and recipe; everything else in bf16 (fp32 on CPU, whose bf16 is itself
emulated). Master weights, optimizer states and the router stay fp32.

:meth:`Precision.convert` turns the built model (on the meta device, before parallelisation) into its FP8 form;
the converted modules keep every parameter's name and shape, so checkpoints, HF export and initialisation do not
depend on the precision. FP8 asked for where it cannot run is refused with the reason and the fix, unless
``precision.fp8.fallback=bf16`` (then: one warning, bf16 training). The model package never imports TE.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from moetrain.config import PrecisionConfig
from moetrain.model.config import ConfigError
from moetrain.precision.blockwise import E4M3_MAX, FP8_BLOCK

__all__ = ["E4M3_MAX", "FP8_BLOCK", "Precision"]


class Precision:
    def __init__(self, cfg: PrecisionConfig, device: torch.device, warn: Callable[[str], None] = print):
        self.cfg, self.device = cfg, device
        choice = cfg.dtype
        self.fp8 = cfg.fp8 if choice == "fp8" else None
        self.native_gemms = None  # the native provider's kernel per kind of GEMM, decided (and probed) once here
        if self.fp8 is not None:
            reason = _fp8_unavailable(self.fp8.provider, self.fp8.recipe, device)
            if reason is not None:
                self._refuse_or_fall_back(reason, warn)
        if self.fp8 is not None and self.fp8.provider == "native":
            from moetrain.precision.native import choose_gemms

            self.native_gemms = choose_gemms(self.fp8.recipe, self.fp8.pow2_scales, self.fp8.gemm, device)
        if choice in ("auto", "fp8"):
            choice = "bf16" if device.type == "cuda" or (choice == "fp8" and self.fp8 is None) else "fp32"
        self.compute_dtype = torch.bfloat16 if choice == "bf16" else torch.float32
        self.tf32 = cfg.tf32 and device.type == "cuda"
        if device.type == "cuda":  # process-wide flags: set both ways, so a second Trainer in one process agrees
            torch.backends.cuda.matmul.fp32_precision = "tf32" if self.tf32 else "ieee"
            torch.backends.cudnn.conv.fp32_precision = "tf32" if self.tf32 else "ieee"

    def _refuse_or_fall_back(self, reason: str, warn: Callable[[str], None]) -> None:
        if self.cfg.fp8.fallback != "bf16":
            raise ConfigError("precision.fp8.provider", f"{reason}; or set precision.fp8.fallback=bf16 to train in "
                                                        "bf16 instead")
        warn(f"precision: FP8 unavailable ({reason}); training in bf16 (precision.fp8.fallback=bf16)")
        self.fp8 = None

    def __str__(self) -> str:
        tf32 = ", fp32 matmuls in TF32" if self.tf32 else ""
        if self.fp8 is None:
            return str(self.compute_dtype).removeprefix("torch.") + tf32
        gemms = ""
        if self.native_gemms is not None:
            real = [k for k in ("dense", "experts") if getattr(self.native_gemms, k) is not None]
            gemms = f", {'scaled ' + ' and '.join(real) if real else 'emulated'} GEMMs"
        return (f"fp8 ({self.fp8.provider}, {self.fp8.recipe}{gemms}; "
                f"{str(self.compute_dtype).removeprefix('torch.')} elsewhere{tf32})")

    def convert(self, model: nn.Module, log: Callable[[str], None] = print) -> None:
        """The model's FP8 form, in place (before parallelisation); nothing without FP8."""
        if self.fp8 is None:
            return
        if self.fp8.provider == "te":
            from moetrain.precision.te import convert_te

            kept = convert_te(model, self.fp8.recipe)
            if kept:
                log(f"precision: {len(kept)} GEMM module(s) stay in bf16, their dimensions not tileable by the "
                    f"{self.fp8.recipe} recipe: {', '.join(kept[:4])}{' ...' if len(kept) > 4 else ''}")
        else:
            from moetrain.precision.native import convert_native

            unfit = convert_native(model, self.fp8.recipe, self.fp8.pow2_scales, self.native_gemms, self.device)
            log(f"precision: native FP8, {self.native_gemms.describe()}")
            if unfit:
                aligns = {k: getattr(self.native_gemms, k).align for k in ("dense", "experts")
                          if getattr(self.native_gemms, k) is not None}
                log(f"precision: {len(unfit)} GEMM module(s) emulated, their features not multiples of the scaled "
                    f"kernels' ({', '.join(f'{k} {a}' for k, a in aligns.items())}): {', '.join(unfit[:4])}"
                    f"{' ...' if len(unfit) > 4 else ''}")

    def checkpoint_fn(self):
        """The activation checkpoint recomputation runs through (see :func:`moetrain.model.layers.recomputed`):
        Transformer Engine's for the te provider, which re-runs the forward inside the recipe's autocast with the
        forward's FP8 scaling state; None (torch's) otherwise: the native provider's quantisers are deterministic
        functions of their inputs, so a re-run forward computes the same values."""
        if self.fp8 is not None and self.fp8.provider == "te":
            from moetrain.precision.te import te_checkpoint

            return te_checkpoint()
        return None

    def autocast(self, amax_group=None):
        """The context every forward runs in: bf16 autocast where the compute dtype is bf16, inside TE's FP8
        autocast for the te provider (``amax_group``: the ranks that share amax statistics, delayed scaling)."""
        ctx = contextlib.ExitStack()
        if self.compute_dtype != torch.float32:
            ctx.enter_context(torch.autocast(self.device.type, dtype=self.compute_dtype))
        if self.fp8 is not None and self.fp8.provider == "te":
            from moetrain.precision.te import te_autocast

            ctx.enter_context(te_autocast(self.fp8.recipe, amax_group))
        return ctx


def _fp8_unavailable(provider: str, recipe: str, device: torch.device) -> str | None:
    """Why FP8 cannot run here (with the fix), or None."""
    if provider == "native":
        return None  # quantisation in torch; GEMMs emulated in fp32 where torch has no scaled kernel: runs anywhere
    if device.type != "cuda":
        return ("Transformer Engine FP8 needs a CUDA GPU; on CPU use precision.fp8.provider=native (emulated "
                "GEMMs) or precision=fp32")
    major, minor = torch.cuda.get_device_capability(device)
    need = (10, 0) if recipe == "mxfp8" else (9, 0)
    if (major, minor) < need:
        return (f"FP8 recipe {recipe} needs compute capability >= {need[0]}.{need[1]}, this is "
                f"{torch.cuda.get_device_name(device)} ({major}.{minor}); use precision=bf16"
                + ("" if recipe != "mxfp8" else " or precision.fp8.recipe=blockwise"))
    try:
        import transformer_engine.pytorch as te
    except ImportError as e:
        return (f"Transformer Engine is not installed ({e}); pip install 'moetrain[gpu]', or use "
                "precision.fp8.provider=native")
    from moetrain.precision.te import te_unavailable

    reason = te_unavailable(te, recipe)  # TE's own verdict (GPU, driver, cuBLAS)
    return None if reason is None else f"{reason}; use precision=bf16"
