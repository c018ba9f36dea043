"""Data-parallel strategies behind one small interface, so the training loop is the same for each.

``parallel.dp_strategy``: ``fsdp`` (FSDP2, the default), ``ddp`` (DistributedDataParallel); DeepSpeed ZeRO is
refused at config time until it is built. The contract every strategy keeps (DESIGN.md, "one gradient
convention"): the loss handed to :meth:`backward` is this rank's share of a global sum over the global
target-token count, and after it each gradient is the SUM over the ranks that hold the same parameter: dense ones
over all data-parallel ranks, experts (already gathered from every ep rank by the all-to-all backward) over the
expert-data-parallel ranks only.

Order of use: ``parallelize`` on the meta model (sharding), then the model is materialised and initialised,
then ``wrap(model)`` returns the module to call forward on.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from moetrain.parallel.data_parallel import apply_fsdp, clip_grad_norm
from moetrain.parallel.mesh import ParallelMesh, all_reduce_sum


class DataParallelStrategy:
    def __init__(self, mesh: ParallelMesh, param_dtype: torch.dtype = torch.float32):
        self.mesh = mesh
        self.param_dtype = param_dtype  # what the wrapper may cast parameters to for compute (fp32 masters stay)

    def parallelize(self, model: nn.Module) -> None:
        """Shard or mark parameters on the meta model (before materialisation); nothing by default."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module whose forward the trainer calls (after initialisation)."""
        return model

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def accumulating(self, module: nn.Module):
        """Context for a micro-batch that is not the step's last: gradients may stay local until the last one."""
        return contextlib.nullcontext()

    def finish_gradients(self, model: nn.Module) -> None:
        """Reductions that backward did not do (called once per optimizer step, before clipping)."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        return clip_grad_norm(list(model.parameters()), max_norm, self.mesh.dp_group)


class FSDPStrategy(DataParallelStrategy):
    """FSDP2: dense units on the data-parallel mesh, each MoE layer's experts on the expert-data-parallel mesh."""

    def parallelize(self, model: nn.Module) -> None:
        if self.mesh.dp > 1:
            apply_fsdp(model, self.mesh, self.param_dtype)


class DDPStrategy(DataParallelStrategy):
    """DistributedDataParallel for dense parameters, summing (not averaging) over the data-parallel ranks; expert
    parameters (DTensors over ep) stay outside DDP and are summed over the expert-data-parallel ranks."""

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.mesh.dp == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        experts = [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, experts)
        ddp = DistributedDataParallel(model, process_group=self.mesh.dp_group, broadcast_buffers=False)
        ddp.register_comm_hook(self.mesh.dp_group, _sum_hook)
        return ddp

    def accumulating(self, module: nn.Module):
        return module.no_sync() if isinstance(module, nn.parallel.DistributedDataParallel) else \
            contextlib.nullcontext()

    def finish_gradients(self, model: nn.Module) -> None:
        for p in model.parameters():
            if isinstance(p, DTensor) and p.grad is not None:
                all_reduce_sum(p.grad.to_local(), self.mesh.edp_group)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        # Dense gradients are whole on every rank (replicated) and expert ones are DTensors over ep: the ep group is
        # the one whose pieces are disjoint; the edp ranks hold equal copies.
        return clip_grad_norm(list(model.parameters()), max_norm, self.mesh.ep_group)


def _sum_hook(group, bucket):
    """DDP communication hook: all-reduce SUM without DDP's division by the world size.

    NOTE: no annotations: DDP checks them against dist.GradBucket, and this module's are strings.
    """
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def build_strategy(name: str, mesh: ParallelMesh, param_dtype: torch.dtype = torch.float32) -> DataParallelStrategy:
    strategies = {"fsdp": FSDPStrategy, "ddp": DDPStrategy}
    return strategies[name](mesh, param_dtype)
