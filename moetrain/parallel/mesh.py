"""The job's one device mesh: pipeline x data ranks, the data ranks split into expert-data x expert parallel.

Dimensions ``("pp", "edp", "ep")``, ep innermost so that contiguous ranks form an expert-parallel group, as
DeepSpeed's expert groups do (ep 2 on 4 ranks: [0, 1], [2, 3]); a flattened ``"dp"`` dimension spans (edp, ep),
so rank = pp_rank * dp + dp_rank and dp_rank = edp_rank * ep + ep_rank. Every group a part of the job reduces
over comes from here; nothing reduces over the whole world by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moetrain._compat import flatten_mesh

if TYPE_CHECKING:  # the config layer sits above parallel/: no import at run time
    from moetrain.config import ParallelConfig

MESH_DIMS = ("pp", "edp", "ep")


@dataclass(frozen=True)
class ParallelMesh:
    """Sizes, this rank's coordinates and the groups of the job's mesh.

    With one process there is no process group: ``device_mesh``, ``dp_mesh`` and every group are None, every
    size is 1 and :func:`all_reduce_sum` is a no-op, so single-process training needs no launcher.
    """

    device_mesh: DeviceMesh | None  # ("pp", "edp", "ep")
    dp_mesh: DeviceMesh | None  # the flattened (edp, ep) dimension: what FSDP shards dense parameters over
    pp: int
    dp: int
    edp: int
    ep: int
    pp_rank: int
    dp_rank: int
    edp_rank: int
    ep_rank: int
    pp_group: ProcessGroup | None
    dp_group: ProcessGroup | None
    edp_group: ProcessGroup | None  # ranks holding the same experts: expert gradients are reduced here
    ep_group: ProcessGroup | None  # ranks exchanging tokens (all-to-all); together they hold every expert

    @property
    def world_size(self) -> int:
        return self.pp * self.dp


def build_mesh(parallel_cfg: ParallelConfig, world_size: int, device_type: str) -> ParallelMesh:
    """Build the mesh once, over the process group that :func:`moetrain.parallel.dist.init_distributed` started,
    for a layout already checked against ``world_size`` (:func:`moetrain.config.checks.check_layout`, when the
    config was composed)."""
    pp, dp, ep = parallel_cfg.pp, parallel_cfg.data_parallel_size(world_size), parallel_cfg.ep
    if world_size == 1:
        return ParallelMesh(None, None, 1, 1, 1, 1, 0, 0, 0, 0, None, None, None, None)
    if not dist.is_initialized() or dist.get_world_size() != world_size:
        raise RuntimeError(f"build_mesh: a process group of {world_size} ranks must be initialised first "
                           "(moetrain.parallel.dist.init_distributed)")
    # NOTE: init_device_mesh reuses the default process group (nccl on CUDA, gloo on CPU, as dist.py chose).
    mesh = init_device_mesh(device_type, (pp, dp // ep, ep), mesh_dim_names=MESH_DIMS)
    # NOTE: DeviceMesh has no public flatten in torch 2.13; _flatten is what torchtitan uses for its "dp" dims.
    dp_mesh = flatten_mesh(mesh["edp", "ep"], "dp")
    return ParallelMesh(
        device_mesh=mesh, dp_mesh=dp_mesh, pp=pp, dp=dp, edp=dp // ep, ep=ep,
        pp_rank=mesh.get_local_rank("pp"), dp_rank=dp_mesh.get_local_rank(),
        edp_rank=mesh.get_local_rank("edp"), ep_rank=mesh.get_local_rank("ep"),
        pp_group=mesh.get_group("pp"), dp_group=dp_mesh.get_group(),
        edp_group=mesh.get_group("edp"), ep_group=mesh.get_group("ep"),
    )


def all_reduce_sum(t: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Sum ``t`` in place over ``group``'s ranks and return it; None (one process) or a group of one: unchanged."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2, expert parallelism); a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t
