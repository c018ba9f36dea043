"""The Transformer Engine FP8 provider (GPU only; imported only when ``precision.fp8.provider=te``).

- Every Linear but the head whose dimensions the recipe can tile (:func:`te_plan`) becomes a ``te.Linear`` holding
  the same ``weight`` Parameter; the others stay in bf16 and are logged. TE's ``_extra_state`` (scaling metadata,
  delayed scaling's amax history) is left out of state dicts and tolerated as missing on load, so checkpoints stay
  TE-free and a resume restarts the amax history.
- Routed experts keep their stacked ``w1``/``w3``/``w2`` Parameters; each weight has its own ``te.GroupedLinear``
  (its own FP8 state), built on the meta device, not a registered submodule, whose per-expert weights are views
  of the stacked Parameter (gradients flow back into the stacked weights; :class:`ExpertGemms`). Rows are padded
  per expert to the recipe's alignment (:func:`padded_rows`, :func:`padded_row_index`) once per MoE layer and
  unpadded after, since TE's FP8 grouped GEMM needs aligned ``m_splits``; one host read of the counts per layer.
- Recomputation (``train.recompute``) runs through TE's ``te.distributed.checkpoint`` (:func:`te_checkpoint`),
  which re-runs the forward inside the recipe's autocast with the forward's FP8 scaling state.
- The forward runs inside TE's autocast with the recipe: ``blockwise`` = ``Float8BlockScaling`` (DeepSeek-V3's
  1x128 / 128x128), ``current`` = ``Float8CurrentScaling``, ``delayed`` = ``DelayedScaling`` (amax reduced over
  the data/expert-parallel group), ``mxfp8`` = ``MXFP8BlockScaling`` (Blackwell).

NOTE: written against Transformer Engine 2.x; no GPU was available when it was written, so tests/test_precision.py's
TE tests (skipped without TE and a Hopper GPU) and benchmarks/gpu.sh are its first runs.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.model.experts import GroupedExperts

# (contraction dim, output dim) multiples each recipe's FP8 GEMMs need: blockwise tiles the contraction by 128
# (1x128 activation tiles, 128x128 weight blocks; a partial block along the output is fine), mxfp8 by 32.
_ALIGN = {"blockwise": (128, 16), "mxfp8": (32, 32), "current": (16, 16), "delayed": (16, 16)}
# Rows per expert (TE's m_splits) are padded to this for the grouped GEMM: TE's FP8 GEMMs want every dimension
# a multiple of 16 (blockwise scaling included: its 1x128 tiles run along the contraction, not the rows) and MXFP8
# a multiple of 32, its scaling block; Megatron-Core pads its grouped GEMMs alike (fp8_utils.get_fp8_align_size).
_ROWS = {"blockwise": 16, "mxfp8": 32, "current": 16, "delayed": 16}


def _te():
    import transformer_engine.pytorch as te

    return te


def fp8_recipe(name: str):
    """TE's recipe object (TE chooses its own scale rounding; precision.fp8.pow2_scales is the native provider's)."""
    from transformer_engine.common import recipe

    if name == "blockwise":
        return recipe.Float8BlockScaling()
    if name == "current":
        return recipe.Float8CurrentScaling()
    if name == "delayed":
        return recipe.DelayedScaling(fp8_format=recipe.Format.HYBRID, amax_history_len=16, amax_compute_algo="max")
    return recipe.MXFP8BlockScaling()


def te_autocast(recipe_name: str, amax_group=None):
    te = _te()
    enter = getattr(te, "autocast", None)
    if enter is not None:  # TE >= 2.8
        return enter(enabled=True, recipe=fp8_recipe(recipe_name), amax_reduction_group=amax_group)
    return te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe(recipe_name), fp8_group=amax_group)


def te_checkpoint():
    """TE's activation checkpoint, called as ``torch.utils.checkpoint.checkpoint`` is by
    :func:`moetrain.model.layers.recomputed` (``use_reentrant=False``, ``context_fn``)."""
    import transformer_engine.pytorch.distributed as te_distributed

    return te_distributed.checkpoint


# TE's verdict on a recipe, by name: TE >= 2.9 has them at the top of transformer_engine.pytorch (``(ok, reason)``
# with return_reason=True), where ``te.fp8`` may be None; older versions have ``te.fp8.check_*`` (``(ok, reason)``).
_AVAILABLE = {"blockwise": "is_fp8_block_scaling_available", "mxfp8": "is_mxfp8_available",
              "current": "is_fp8_available", "delayed": "is_fp8_available"}
_LEGACY_CHECK = {"blockwise": "check_fp8_block_scaling_support", "mxfp8": "check_mxfp8_support",
                 "current": "check_fp8_support", "delayed": "check_fp8_support"}


def capability_check(recipe_name: str, top_level: Collection[str], legacy: Collection[str]) -> tuple[str, str] | None:
    """Which of TE's functions judges ``recipe_name``: ``("", name)`` for ``te.name(return_reason=True)``,
    ``("fp8", name)`` for the older ``te.fp8.name()``, or None where this TE has neither (``top_level``: the names
    of ``transformer_engine.pytorch``, ``legacy``: those of its ``fp8`` module, empty where it is None)."""
    if _AVAILABLE[recipe_name] in top_level:
        return "", _AVAILABLE[recipe_name]
    if _LEGACY_CHECK[recipe_name] in legacy:
        return "fp8", _LEGACY_CHECK[recipe_name]
    return None


def te_unavailable(te, recipe_name: str) -> str | None:
    """Why ``te`` (the ``transformer_engine.pytorch`` module) cannot run ``recipe_name`` here, or None."""
    legacy = getattr(te, "fp8", None)
    check = capability_check(recipe_name, dir(te), dir(legacy) if legacy is not None else ())
    if check is None:
        return (f"this Transformer Engine ({getattr(te, '__version__', 'unknown version')}) has no capability "
                f"check for the {recipe_name} recipe ({_AVAILABLE[recipe_name]} or fp8.{_LEGACY_CHECK[recipe_name]}), "
                "so it is too old or too new for moetrain to tell whether the recipe runs")
    namespace, name = check
    ok, why = getattr(te, name)(return_reason=True) if not namespace else getattr(legacy, name)()
    return None if ok else f"Transformer Engine cannot run the {recipe_name} recipe here: {why}"


def _drop_extra_state(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix) and k.endswith("_extra_state")]:
        del state_dict[key]


def _keep_own_extra_state(module, state_dict, prefix, *args):
    key = prefix + "_extra_state"
    if key not in state_dict:
        state_dict[key] = module.get_extra_state()


def te_plan(model: nn.Module, recipe_name: str) -> tuple[list[str], list[str]]:
    """(modules to run in FP8, Linears / experts kept in bf16 because the recipe cannot tile their dimensions),
    by name; the head always stays (DeepSeek-V3 keeps it in high precision). No TE needed."""
    k_align, n_align = _ALIGN[recipe_name]
    fp8, kept = [], []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name.split(".")[-1] != "head":
            dims = [(module.in_features, module.out_features)]
        elif type(module) is GroupedExperts:
            dims = [tuple(reversed(w.shape[-2:])) for w in (module.w1, module.w2)]  # (in, out) per GEMM
        else:
            continue
        (fp8 if all(k % k_align == 0 and n % n_align == 0 for k, n in dims) else kept).append(name)
    return fp8, kept


def _te_linear(linear: nn.Linear) -> nn.Module:
    te_linear = _te().Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                             params_dtype=torch.float32, device="meta")
    te_linear.weight = linear.weight  # the same Parameter: name, shape, initialisation
    if linear.bias is not None:
        te_linear.bias = linear.bias
    te_linear._register_state_dict_hook(_drop_extra_state)
    te_linear._register_load_state_dict_pre_hook(_keep_own_extra_state, with_module=True)
    return te_linear


def padded_rows(counts: list[int], align: int) -> list[int]:
    """Each expert's row count rounded up to ``align`` (0 stays 0): the ``m_splits`` TE's grouped GEMM runs."""
    return [-(-c // align) * align for c in counts]


def padded_row_index(counts_E: torch.Tensor, align: int, n_rows: int) -> torch.Tensor:
    """For each of the ``n_rows`` (= counts_E.sum()) rows sorted by expert, its row in the padded layout of
    :func:`padded_rows`, computed on the device (no host read, no loop over experts): row i of expert e moves by
    the padding of experts 0..e-1, ``padded_start_e - start_e``."""
    padded_E = (counts_E + align - 1) // align * align
    shift_E = torch.cumsum(padded_E - counts_E, dim=0) - (padded_E - counts_E)  # exclusive prefix sum
    return torch.arange(n_rows, device=counts_E.device) + torch.repeat_interleave(shift_E, counts_E,
                                                                                  output_size=n_rows)


class ExpertGemms:
    """One grouped-GEMM module per stacked expert weight, by the weight's name (``w1``, ``w3``, ``w2``), so that
    no two weights share a module's FP8 state (delayed scaling's amax history, scales). Each module's per-expert
    weights ``weight0..weight{E-1}`` are views of the stacked tensor (TE's weight gradients flow back into it);
    they are set when the module is made and again only when the stacked tensor handed in is another object or
    its storage moved (FSDP's unsharded parameter keeps its object and storage across reshards; the local tensor
    of an expert-parallel DTensor without FSDP is a new object per call, so there they are set per call).

    ``make(n_gemms, in_features, out_features)``: a module with parameters ``weight{e}`` ([out, in]) and
    ``forward(x, m_splits)`` (``te.GroupedLinear``, built on the meta device: its own weights are never used)."""

    def __init__(self, make):
        self.make = make
        self.modules: dict[str, nn.Module] = {}
        self._bound: dict[str, torch.Tensor] = {}

    def module(self, name: str, w_EOI: torch.Tensor) -> nn.Module:
        E, O, I = w_EOI.shape
        gemm = self.modules.get(name)
        if gemm is None:
            gemm = self.modules[name] = self.make(E, I, O)
        if self._bound.get(name) is not w_EOI or gemm.weight0.data_ptr() != w_EOI.data_ptr():
            with torch.enable_grad():  # views made under no_grad would carry no gradient back, ever after
                for e, w_OI in enumerate(w_EOI.unbind(0)):
                    gemm._parameters[f"weight{e}"] = w_OI
            self._bound[name] = w_EOI
        return gemm


def _te_grouped_linear(n_gemms: int, in_features: int, out_features: int) -> nn.Module:
    # NOTE: on the meta device: E fp32 [out, in] weights on the GPU would be ~15 GB transient at DeepSeek-V3's
    # scale, and ExpertGemms replaces them by views of the stacked Parameter at once.
    return _te().GroupedLinear(n_gemms, in_features, out_features, bias=False, params_dtype=torch.float32,
                               device="meta")


class TEGroupedExperts(GroupedExperts):
    """GroupedExperts (same stacked w1/w3/w2) whose grouped GEMMs run through TE's GroupedLinear, one per weight.

    Rows are padded per expert to ``align`` once per call (zero rows; ``silu(0) * 0 = 0`` keeps them zero through
    the SwiGLU, so the down projection takes the padded hidden rows as they are) and unpadded after ``w2``."""

    align: int
    gemms: ExpertGemms

    @classmethod
    def from_experts(cls, experts: GroupedExperts, align: int, make=_te_grouped_linear) -> "TEGroupedExperts":
        new = cls.sharing(experts)
        new.align = align
        object.__setattr__(new, "gemms", ExpertGemms(make))  # not submodules: no state in checkpoints
        return new

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # NOTE: the one host read of this layer: TE's GroupedLinear takes m_splits as a Python list of ints.
        counts = counts_E.tolist()
        m_splits = padded_rows(counts, self.align)
        rows_N = None if m_splits == counts else padded_row_index(counts_E, self.align, x_ND.shape[0])
        x_MD = x_ND if rows_N is None else x_ND.new_zeros(sum(m_splits), x_ND.shape[1]).index_copy(0, rows_N, x_ND)
        w1, w3, w2 = self.local_weights()
        gemm = self.gemms.module
        h_MF = F.silu(gemm("w1", w1)(x_MD, m_splits)) * gemm("w3", w3)(x_MD, m_splits)
        y_MD = gemm("w2", w2)(h_MF, m_splits)
        return y_MD if rows_N is None else y_MD.index_select(0, rows_N)


def convert_te(model: nn.Module, recipe_name: str) -> list[str]:
    """The modules of :func:`te_plan` to ``te.Linear`` / :class:`TEGroupedExperts`, in place; returns the names
    of those kept in bf16."""
    fp8, kept = te_plan(model, recipe_name)
    for name in fp8:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        child = getattr(parent, child_name)
        new = _te_linear(child) if type(child) is nn.Linear else TEGroupedExperts.from_experts(child, _ROWS[recipe_name])
        setattr(parent, child_name, new)
    return kept
