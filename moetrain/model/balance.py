"""Auxiliary-loss-free load balancing (per-step bias update, MaxVio) and the balance-loss metric.

Balance state is keyed by global layer id (main blocks 0..n_layers-1, then MTP blocks), so a process that holds
only some layers (a pipeline stage) reports and updates exactly its own rows.

The update runs once per optimizer step, outside ``forward``, on the per-expert token counts of the whole global
batch: ``b_i += gamma * sign(mean_load - load_i)``. Summing counts across ranks is the caller's job (the trainer
all-reduces the [L, E] tensor from :func:`collect_expert_counts`), so this module stays process-free.
"""

from __future__ import annotations

import torch
from torch import nn

from moetrain.model.moe import MoE
from moetrain.model.router import Router

# (layer_ids, counts_LE): row l of counts_LE holds the per-expert token counts of global layer layer_ids[l].
ExpertCounts = tuple[list[int], torch.Tensor]


def _by_layer(modules: list, kind: str) -> list:
    modules = sorted(modules, key=lambda m: m.layer_id)
    ids = [m.layer_id for m in modules]
    if len(set(ids)) != len(ids):
        raise ValueError(f"two {kind} modules share a layer id: {ids}")
    return modules


def routers(model: nn.Module) -> list[Router]:
    """Every router of the model in ascending global layer id."""
    return _by_layer([m for m in model.modules() if isinstance(m, Router)], "router")


def collect_expert_counts(model: nn.Module) -> ExpertCounts:
    """This process's fp32 token counts since the last update: (layer_ids ascending, counts_LE)."""
    rs = routers(model)
    if not rs:
        return [], torch.zeros(0, 0)
    return [r.layer_id for r in rs], torch.stack([r.tokens_per_expert for r in rs])


def max_violation(counts_LE: torch.Tensor) -> torch.Tensor:
    """MaxVio per layer: (max_i load_i - mean load) / mean load, 0 for a perfectly balanced layer."""
    mean_L = counts_LE.mean(dim=-1)
    return (counts_LE.max(dim=-1).values - mean_L) / mean_L.clamp_min(1e-9)


@torch.no_grad()
def update_expert_bias(model: nn.Module, gamma: float, counts: ExpertCounts | None = None) -> torch.Tensor:
    """Apply ``b += gamma * sign(mean - count)`` per layer, reset the counts, and return MaxVio per layer.

    counts: the global batch's counts (already summed over ranks), keyed like :func:`collect_expert_counts`, with
    exactly this model's layers; defaults to this process's counts. MaxVio rows follow ``counts``' layer ids.
    """
    rs = {r.layer_id: r for r in routers(model)}
    layer_ids, counts_LE = collect_expert_counts(model) if counts is None else counts
    if sorted(layer_ids) != sorted(rs):
        raise ValueError(f"expert counts are for layers {list(layer_ids)}, but this model routes in layers {list(rs)}")
    if not rs:
        return torch.zeros(0)
    counts_LE = counts_LE.to(torch.float32)
    for layer_id, counts_E in zip(layer_ids, counts_LE):
        r = rs[layer_id]
        counts_E = counts_E.to(r.expert_bias.device)
        if gamma and r.cfg.selection_bias:
            r.expert_bias += gamma * torch.sign(counts_E.mean() - counts_E)
        r.tokens_per_expert.zero_()
    return max_violation(counts_LE)


def pop_balance_loss(model: nn.Module) -> dict[int, torch.Tensor]:
    """{layer_id: detached sum of the sequence-wise balance losses of the forwards since the last call}, then reset.

    Layers without a balance loss in that window (alpha = 0, evaluation, no forward) are left out.
    """
    out = {}
    for m in _by_layer([m for m in model.modules() if isinstance(m, MoE)], "MoE"):
        if m.balance_loss_sum is not None:
            out[m.layer_id], m.balance_loss_sum = m.balance_loss_sum, None
    return out
