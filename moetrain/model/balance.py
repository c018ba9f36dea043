"""Auxiliary-loss-free load balancing: the per-step bias update and the MaxVio balance metric.

The update runs once per optimizer step, outside ``forward``, on the per-expert token counts of the whole global
batch: ``b_i += gamma * sign(mean_load - load_i)``. Summing counts across ranks is the caller's job (the
trainer all-reduces the [L, E] tensor from :func:`collect_expert_counts`), so this module stays process-free.
"""

from __future__ import annotations

import torch
from torch import nn

from moetrain.model.router import Router


def routers(model: nn.Module) -> list[Router]:
    """Every router of the model (main blocks, then MTP blocks), in a stable order."""
    return [m for m in model.modules() if isinstance(m, Router)]


def collect_expert_counts(model: nn.Module) -> torch.Tensor:
    """[L, E] fp32 token counts since the last reset, one row per router."""
    rs = routers(model)
    if not rs:
        return torch.zeros(0, 0)
    return torch.stack([r.tokens_per_expert for r in rs])


def max_violation(counts_LE: torch.Tensor) -> torch.Tensor:
    """MaxVio per layer: (max_i load_i - mean load) / mean load, 0 for a perfectly balanced layer."""
    mean_L = counts_LE.mean(dim=-1)
    return (counts_LE.max(dim=-1).values - mean_L) / mean_L.clamp_min(1e-9)


@torch.no_grad()
def update_expert_bias(model: nn.Module, gamma: float, counts_LE: torch.Tensor | None = None) -> torch.Tensor:
    """Apply ``b += gamma * sign(mean - count)`` per layer, reset the counts, and return MaxVio per layer.

    counts_LE: the global batch's counts (already summed over ranks); defaults to this process's counts.
    """
    rs = routers(model)
    if counts_LE is None:
        counts_LE = collect_expert_counts(model)
    if not rs:
        return torch.zeros(0)
    counts_LE = counts_LE.to(torch.float32)
    for r, counts_E in zip(rs, counts_LE):
        counts_E = counts_E.to(r.expert_bias.device)
        if gamma and r.cfg.selection_bias:
            r.expert_bias += gamma * torch.sign(counts_E.mean() - counts_E)
        r.tokens_per_expert.zero_()
    return max_violation(counts_LE)


def collect_balance_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the balance losses of the last forward pass over every MoE layer (detached), or None."""
    from moetrain.model.moe import MoE

    losses = [m.last_balance_loss for m in model.modules() if isinstance(m, MoE) and m.last_balance_loss is not None]
    return torch.stack(losses).sum() if losses else None
