"""Data parallelism with FSDP2: each block and MTP module is one sharding unit, the root holds the ends.

Expert weights (DTensors sharded over ep by :func:`apply_expert_parallel`) are their own unit per MoE layer on the
expert-data-parallel mesh (the ranks holding the same experts), as in torchtitan. Every unit sums gradients
instead of averaging them: the losses are already global sums over the global target-token count, and the
all-to-all backward has already brought every ep rank's tokens into an expert's gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from moetrain._compat import foreach_mul_, foreach_norm
from moetrain.model.moe import MoE
from moetrain.model.transformer import Transformer
from moetrain.parallel.mesh import ParallelMesh, local_tensor


def apply_fsdp(model: Transformer, mesh: ParallelMesh, param_dtype: torch.dtype = torch.float32,
               roots: list[nn.Module] | None = None) -> None:
    """Shard parameters, gradients and optimizer state over the data-parallel ranks (fp32 master weights).

    ``roots``: the modules forward runs on, each an FSDP root holding the parameters outside the blocks (default
    the model; pipeline stages otherwise).

    ``param_dtype=bfloat16`` (GPU): units gather bf16 parameters and reduce gradients in fp32, except the routers,
    units of their own that stay fp32 (DeepSeek-V3 keeps the gate in full precision).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # Pipeline stages run several micro-batches' forwards before their backwards: keep the gathered parameters
    # for the step instead of gathering them again for every micro-batch (as torchtitan does with pp).
    shard = dict(mesh=mesh.dp_mesh, reshard_after_forward=roots is None)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    units = []
    if param_dtype != torch.float32:
        units += [fully_shard(m.gate, mp_policy=MixedPrecisionPolicy(), **shard) for m in moes]
    if mesh.ep > 1:
        edp = dict(shard, mesh=mesh.device_mesh["edp"])
        units += [fully_shard(m.experts, mp_policy=policy, **edp) for m in moes]
    for block in list(model.layers.values()) + list(model.mtp.values()):
        units.append(fully_shard(block, mp_policy=policy, **shard))
    units += [fully_shard(root, mp_policy=policy, **shard) for root in roots or [model]]
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # sum over ranks
        # NOTE: plain SUM collectives (gloo has no PREMUL_SUM; NCCL transfers them zero-copy too).
        unit.set_force_sum_reduction_for_comms(True)


@torch.no_grad()
def clip_grad_norm(params: list[torch.Tensor], max_norm: float, group=None, stage_group=None,
                   uncounted: frozenset[int] = frozenset()) -> torch.Tensor:
    """One global gradient norm over every parameter, whatever mesh it is sharded on; clip to ``max_norm``.

    FSDP2 shards dense parameters over dp and experts over (edp, ep): either way each rank holds a disjoint piece,
    so the squared norms of the local pieces summed over the data-parallel ``group`` give the whole norm (torch's
    clip_grad_norm_ cannot mix DTensors of different meshes). Plain tensors are replicated and counted once.
    Pipeline stages hold disjoint parameters: their squared norms are summed over ``stage_group``. Parameters whose
    id is in ``uncounted`` are clipped but not counted (a tied copy whose gradient its original already counts).

    Returns the norm before clipping as a 0-dim fp32 tensor on the device: nothing here waits for the host (one
    foreach norm per group of pieces, one foreach scale; a non-finite norm leaves the gradients as they are, the
    trainer skips that step).
    """
    grads = [local_tensor(p.grad) for p in params if p.grad is not None]
    counted = [p.grad for p in params if p.grad is not None and id(p) not in uncounted]
    sharded = [g.to_local() for g in counted if isinstance(g, DTensor)]
    replicated = [g for g in counted if not isinstance(g, DTensor)]
    device = grads[0].device if grads else "cpu"
    sharded_sq = _sum_of_squares(sharded, device)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(sharded_sq, group=group)
    total_sq = sharded_sq + _sum_of_squares(replicated, device)
    if stage_group is not None and dist.get_world_size(stage_group) > 1:
        dist.all_reduce(total_sq, group=stage_group)
    total = total_sq.sqrt()
    if max_norm and grads:
        coef = torch.where(total.isfinite(), (max_norm / (total + 1e-6)).clamp(max=1.0), 1.0)
        for dtype in {g.dtype for g in grads}:
            foreach_mul_([g for g in grads if g.dtype == dtype], coef.to(dtype))
    return total


def _sum_of_squares(tensors: list[torch.Tensor], device) -> torch.Tensor:
    """sum_i ||t_i||^2 in fp32 (one foreach norm), 0 for none."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack(foreach_norm([t.float() for t in tensors])).square().sum()
