"""Data parallelism with FSDP2: each block and MTP module is one sharding unit, the root holds the ends."""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh

from moetrain.model.transformer import Transformer


def apply_fsdp(model: Transformer, mesh: DeviceMesh) -> None:
    """Shard parameters, gradients and optimizer state over the 1-D ``mesh`` (the job mesh's flattened dp
    dimension, :attr:`ParallelMesh.dp_mesh`), keeping fp32 master weights."""
    from torch.distributed.fsdp import fully_shard

    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    for mtp in model.mtp.values():
        fully_shard(mtp, mesh=mesh)
    fully_shard(model, mesh=mesh)
