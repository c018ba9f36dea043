"""Data-parallel strategies behind one small interface, so the training loop is the same for each.

``parallel.dp_strategy``: ``fsdp`` (FSDP2, the default), ``ddp`` (DistributedDataParallel), ``deepspeed`` (ZeRO-1/2,
:mod:`moetrain.parallel.zero`, importing deepspeed only when chosen; built by
:func:`moetrain.parallel.parallelize.build_strategy`). The contract every strategy keeps (DESIGN.md, "one gradient
convention"): the loss handed to :meth:`backward` is this rank's share of a global sum over the global
target-token count, and after it each gradient is the SUM over the ranks that hold the same parameter: dense ones
over all data-parallel ranks, experts (already gathered from every ep rank by the all-to-all backward) over the
expert-data-parallel ranks only.

Order of use: ``parallelize`` on the meta model (sharding), then the model is materialised and initialised,
then ``wrap(model, make_optimizer)`` returns the callable to run forward on and the optimizer. Per optimizer step:
``backward`` per micro-batch (all but the last inside ``accumulating``), ``finish_gradients``, ``clip_grad_norm``,
``step`` (unless the step is skipped), ``zero_grad``. Checkpoints go through ``state_dict`` / ``load_state_dict``:
the state of ``torch.distributed.checkpoint.state_dict.get_state_dict`` (names and global shapes whatever the layout).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from moetrain._compat import ddp_ignore
from moetrain.parallel.data_parallel import apply_fsdp, clip_grad_norm
from moetrain.parallel.mesh import ParallelMesh, all_reduce_sum


class DataParallelStrategy:
    # What backward multiplies the loss by to get the convention's sums out of the wrapper's reductions. Side losses
    # that add their gradient inside backward (the sequence-wise balance loss) must be weighted by it as well.
    loss_scale: float = 1.0

    def __init__(self, mesh: ParallelMesh, param_dtype: torch.dtype = torch.float32):
        self.mesh = mesh
        self.param_dtype = param_dtype  # what the wrapper may cast parameters to for compute (fp32 masters stay)

    def parallelize(self, model: nn.Module, roots: list[nn.Module] | None = None) -> None:
        """Shard or mark parameters on the meta model (before materialisation); nothing by default.

        ``roots``: the modules forward is called on when that is not ``model`` (pipeline stages)."""

    def wrap(self, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]):
        """(what the trainer calls forward on, the optimizer), after initialisation."""
        return model, make_optimizer(model)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def accumulating(self, module: nn.Module):
        """Context for a micro-batch that is not the step's last: gradients may stay local until the last one."""
        return contextlib.nullcontext()

    def finish_gradients(self, model: nn.Module) -> None:
        """Reductions that backward did not do (called once per optimizer step, before clipping)."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float,
                       uncounted: frozenset[int] = frozenset()) -> torch.Tensor:
        """The global gradient norm before clipping (a 0-dim device tensor: no host sync), over every stage; gradients are clipped to ``max_norm`` (0: not
        clipped). ``uncounted``: ids of parameters clipped but left out of the norm (a tied copy counted elsewhere)."""
        return clip_grad_norm(list(model.parameters()), max_norm, self.mesh.dp_group, self.mesh.pp_group, uncounted)

    def step(self, optimizer) -> None:
        optimizer.step()

    def zero_grad(self, optimizer) -> None:
        """After every step, taken or skipped."""
        optimizer.zero_grad(set_to_none=True)

    def state_dict(self, model: nn.Module, optimizer) -> tuple[dict, dict]:
        """Optimizer state flattened to one entry per parameter name (``state.<name>.exp_avg``,
        ``param_groups.<name>.lr``), so that pipeline ranks holding different parameters save and load it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))

    def load_state_dict(self, model: nn.Module, optimizer, model_sd: dict, optim_sd: dict | None) -> None:
        """Set the model (and the optimizer, unless ``optim_sd`` is None) from state of :meth:`state_dict`'s form."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

        if optim_sd is None:
            set_model_state_dict(model, model_sd)
        else:
            set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                           options=StateDictOptions(flatten_optimizer_state_dict=True))


class FSDPStrategy(DataParallelStrategy):
    """FSDP2: dense units on the data-parallel mesh, each MoE layer's experts on the expert-data-parallel mesh."""

    def parallelize(self, model: nn.Module, roots: list[nn.Module] | None = None) -> None:
        if self.mesh.dp > 1:
            apply_fsdp(model, self.mesh, self.param_dtype, roots)


class DDPStrategy(DataParallelStrategy):
    """DistributedDataParallel for dense parameters, summing (not averaging) over the data-parallel ranks; expert
    parameters (DTensors over ep) stay outside DDP and are summed over the expert-data-parallel ranks."""

    def wrap(self, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]):
        if self.mesh.dp == 1:
            return model, make_optimizer(model)
        from torch.nn.parallel import DistributedDataParallel

        experts = [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
        ddp_ignore(model, experts)
        ddp = DistributedDataParallel(model, process_group=self.mesh.dp_group, broadcast_buffers=False)
        ddp.register_comm_hook(self.mesh.dp_group, _sum_hook)
        return ddp, make_optimizer(model)

    def accumulating(self, module: nn.Module):
        return module.no_sync() if isinstance(module, nn.parallel.DistributedDataParallel) else \
            contextlib.nullcontext()

    def finish_gradients(self, model: nn.Module) -> None:
        for p in model.parameters():
            if isinstance(p, DTensor) and p.grad is not None:
                all_reduce_sum(p.grad.to_local(), self.mesh.edp_group)

    def clip_grad_norm(self, model: nn.Module, max_norm: float,
                       uncounted: frozenset[int] = frozenset()) -> torch.Tensor:
        # ``uncounted`` is for pipeline stages, which run with fsdp only (config.check_supported).
        # Dense gradients are whole on every rank (replicated) and expert ones are DTensors over ep: the ep group is
        # the one whose pieces are disjoint; the edp ranks hold equal copies.
        return clip_grad_norm(list(model.parameters()), max_norm, self.mesh.ep_group)


def _sum_hook(group, bucket):
    """DDP communication hook: all-reduce SUM without DDP's division by the world size.

    NOTE: no annotations: DDP checks them against dist.GradBucket, and this module's are strings.
    """
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])
