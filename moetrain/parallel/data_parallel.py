"""Data parallelism with FSDP2: each block and MTP module is one sharding unit, the root holds the ends."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh

from moetrain.model.transformer import Transformer


def apply_fsdp(model: Transformer, dp_size: int, device: torch.device) -> None:
    """Shard parameters, gradients and optimizer state over ``dp_size`` ranks (fp32 master weights)."""
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dp_size,), mesh_dim_names=("dp",))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    for mtp in model.mtp.values():
        fully_shard(mtp, mesh=mesh)
    fully_shard(model, mesh=mesh)
