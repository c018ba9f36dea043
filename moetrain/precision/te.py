"""The Transformer Engine FP8 provider (GPU only; imported only when ``precision.fp8.provider=te``).

- Every Linear but the head whose dimensions the recipe can tile (:func:`te_plan`) becomes a ``te.Linear`` holding
  the same ``weight`` Parameter; the others stay in bf16 and are logged. TE's ``_extra_state`` (scaling metadata,
  delayed scaling's amax history) is left out of state dicts and tolerated as missing on load, so checkpoints stay
  TE-free and a resume restarts the amax history.
- Routed experts keep their stacked ``w1``/``w3``/``w2`` Parameters; each grouped GEMM runs through a
  ``te.GroupedLinear`` that is not a registered submodule and whose per-expert weights are views of the stacked
  Parameter, set before each call (gradients flow back into the stacked weights). Rows are padded per expert to
  the recipe's alignment and unpadded after, since TE's FP8 grouped GEMM needs aligned ``m_splits``.
- The forward runs inside TE's autocast with the recipe: ``blockwise`` = ``Float8BlockScaling`` (DeepSeek-V3's
  1x128 / 128x128), ``current`` = ``Float8CurrentScaling``, ``delayed`` = ``DelayedScaling`` (amax reduced over
  the data/expert-parallel group), ``mxfp8`` = ``MXFP8BlockScaling`` (Blackwell).

NOTE: written against Transformer Engine 2.x; no GPU was available when it was written, so tests/test_precision.py's
TE tests (skipped without TE and a Hopper GPU) and benchmarks/gpu.sh are its first runs.
"""

from __future__ import annotations

import torch
from torch import nn

from moetrain.model.experts import GroupedExperts

# (contraction dim, output dim) multiples each recipe's FP8 GEMMs need: blockwise tiles the contraction by 128
# (1x128 activation tiles, 128x128 weight blocks; a partial block along the output is fine), mxfp8 by 32.
_ALIGN = {"blockwise": (128, 16), "mxfp8": (32, 32), "current": (16, 16), "delayed": (16, 16)}
# Rows per expert are padded to this for the grouped GEMM.
_ROWS = {"blockwise": 128, "mxfp8": 32, "current": 16, "delayed": 16}


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


class TEGroupedExperts(GroupedExperts):
    """GroupedExperts (same stacked w1/w3/w2) whose grouped GEMMs run through TE's GroupedLinear."""

    align: int

    @classmethod
    def from_experts(cls, experts: GroupedExperts, align: int) -> "TEGroupedExperts":
        new = cls.sharing(experts)
        new.align = align
        object.__setattr__(new, "_gemms", {})  # (experts, out, in) -> te.GroupedLinear, not submodules
        return new

    def _gemm(self, n: int, out_features: int, in_features: int):
        key = (n, out_features, in_features)
        if key not in self._gemms:
            self._gemms[key] = _te().GroupedLinear(n, in_features, out_features, bias=False,
                                                   params_dtype=torch.float32, device="cuda")
        return self._gemms[key]

    def grouped_mm(self, x_NI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        E, O, I = w_EOI.shape
        gemm = self._gemm(E, O, I)
        for e in range(E):  # views of the stacked Parameter: TE's weight gradients flow back into it
            gemm._parameters[f"weight{e}"] = w_EOI[e]
        counts = counts_E.tolist()
        padded = [-(-c // self.align) * self.align for c in counts]
        if padded == counts:
            return gemm(x_NI, counts)
        rows = torch.cat([torch.arange(c, device=x_NI.device) + start
                          for c, start in zip(counts, _starts(padded))]) if x_NI.shape[0] else \
            torch.zeros(0, dtype=torch.long, device=x_NI.device)
        x_pad = x_NI.new_zeros(sum(padded), I).index_copy(0, rows, x_NI)
        return gemm(x_pad, padded).index_select(0, rows)


def _starts(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


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
