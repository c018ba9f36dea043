"""Initialisation of a model whose parameters may be DTensors (FSDP2 shards, expert-parallel layouts).

The values are those of :func:`moetrain.model.init.init_weights` on one process: each rank draws only the dim-0
rows it holds whenever every placement is a dim-0 shard or a replica, and otherwise draws the full tensor and keeps
its part. A layout change therefore never changes the initial model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from moetrain.model.init import init_weights as init_model_weights
from moetrain.model.init import write_full


def init_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Initialise ``model`` (plain or DTensor parameters) to the same values as one process would."""
    return init_model_weights(model, seed, write_param=write_any_layout)


def write_any_layout(p: torch.Tensor, rows_of: Callable[[Sequence[int]], torch.Tensor]) -> None:
    if not isinstance(p, DTensor):
        write_full(p, rows_of)
    elif (rows := local_rows(p)) is not None:
        p.to_local().copy_(rows_of(rows))
    else:  # a placement splits another dim (or is partial): draw in full, keep this rank's part
        full = rows_of(range(p.shape[0])).to(device=p.device, dtype=p.dtype)
        p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local())


def local_rows(p: DTensor) -> list[int] | None:
    """The global dim-0 rows this rank holds, in local order, when every placement is a dim-0 shard (plain or
    strided, as FSDP2 over expert-parallel shards makes) or a replica; else None.

    Sharding the row indices [0, n) with the same placements gives them exactly; ``src_data_rank=None`` makes
    every rank split its own copy, so nothing is communicated.
    """
    if not all(pl.is_replicate() or getattr(pl, "dim", None) == 0 for pl in p.placements):
        return None
    rows_N = torch.arange(p.shape[0], device=p.device)
    return distribute_tensor(rows_N, p.device_mesh, p.placements, src_data_rank=None).to_local().tolist()
