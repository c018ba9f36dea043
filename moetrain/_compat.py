"""Every private torch API moetrain uses, in one place, each with the torch version it was checked on.

A private API may change without notice: when torch is upgraded, this file is the list to re-check (tests cover
each use). Nothing here imports torch.distributed at module level, so the model layer may use it.

Checked on torch 2.13.0 (CPU, gloo) and 2.11 (CUDA 13, the lent GPU machine's):
- ``torch._grouped_mm``: the routed experts' grouped GEMM (fp32 eager on CPU; bf16 everywhere).
- ``torch.utils._pytree.register_dataclass``: LMOutput as a pytree node for FSDP2 and torch.compile.
- ``DeviceMesh._flatten``: the flattened (edp, ep) "dp" dimension (torchtitan uses it too; no public flatten).
- ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``: expert DTensors outside DDP.
- ``torch.distributed.checkpoint._traverse.set_element``: the safe reader's non-tensor items.
- ``torch.cuda.memory._record_memory_history`` / ``_dump_snapshot``: train.profile.memory.
- ``torch._foreach_norm`` / ``torch._foreach_mul_``: the gradient clip, one kernel per list (as torch's own
  clip_grad_norm_ and optimizers use them).
- ``torch.utils._python_dispatch.TorchDispatchMode``: the host-sync counter (moetrain.host_syncs).
- ``PipelineStage._prepare_forward_infra`` / ``_prepare_backward_infra``: overridden by the pipeline's timed
  stage so that shape inference counts no tokens (:data:`PIPELINE_SHAPE_INFERENCE`, checked at import there).
- ``torch._higher_order_ops.flex_attention.flex_attention`` and ``flex_attention._apply_kernel_options``:
  FlexAttention off CUDA with gradients (:func:`flex_attention_eager`; CPU only, checked on 2.13).
"""

from __future__ import annotations

import functools
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: F401  (re-exported)

PIPELINE_SHAPE_INFERENCE = ("_prepare_forward_infra", "_prepare_backward_infra")


def has_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


def grouped_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x_NI in groups ending at ``offs`` (int32 cumulative counts), each times its w_EIO[e]."""
    return torch._grouped_mm(x_NI, w_EIO, offs=offs)


def foreach_norm(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The 2-norm of each tensor (0-dim, its dtype)."""
    return list(torch._foreach_norm(tensors))


def foreach_mul_(tensors: list[torch.Tensor], scalar: torch.Tensor) -> None:
    """Every tensor times a 0-dim tensor of their dtype, in place."""
    torch._foreach_mul_(tensors, scalar)


def register_pytree_dataclass(cls: type) -> type:
    torch.utils._pytree.register_dataclass(cls)
    return cls


def flatten_mesh(mesh, name: str):
    """One dimension spanning all of ``mesh``'s (a sub-mesh of named dimensions)."""
    return mesh._flatten(name)


def ddp_ignore(model: torch.nn.Module, names: list[str]) -> None:
    """Parameters and buffers DDP neither broadcasts nor reduces (set before wrapping)."""
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def dcp_set_element(state_dict: dict, path, value) -> None:
    """Put ``value`` at a DCP object path of a (nested) state dict, as DCP's own loader does."""
    from torch.distributed.checkpoint._traverse import set_element

    set_element(state_dict, path, value)


def record_cuda_memory_history(enabled: bool) -> None:
    if enabled:
        torch.cuda.memory._record_memory_history(max_entries=100_000)
    else:
        torch.cuda.memory._record_memory_history(enabled=None)


def dump_cuda_memory_snapshot(path: str) -> None:
    torch.cuda.memory._dump_snapshot(path)


def require_methods(cls: type, names: tuple[str, ...]) -> None:
    """Fail at import, naming the method, where this torch lacks a private method moetrain overrides."""
    missing = [n for n in names if not hasattr(cls, n)]
    if missing:
        raise ImportError(f"torch {torch.__version__}: {cls.__name__} has no {', '.join(missing)} (moetrain checked "
                          "its overrides on torch 2.13; see moetrain/_compat.py)")


def compile_disabled(fn=None, *, recursive: bool = True):
    """``torch.compiler.disable(fn, recursive=...)``, wrapped on the first call made while dynamo is loaded.

    NOTE: torch.compiler.disable imports dynamo and inductor (~2 s, most of a process's start after torch itself),
    and as a decorator it would do so at import in every process: the launcher's ranks, the CLI, the data workers.
    Nothing can be compiling in a process that has not imported dynamo, so until then ``fn`` runs as it is.
    """
    if fn is None:
        return functools.partial(compile_disabled, recursive=recursive)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        return _disabled(fn, recursive)(*args, **kwargs)

    return call


@functools.cache
def _disabled(fn, recursive: bool):
    return torch.compiler.disable(fn, recursive=recursive)


def _identity_score(score, b, h, q_idx, kv_idx):
    return score


@compile_disabled  # a compiled block (train.compile) runs it eagerly: CPU's compiled flex has no backward
def flex_attention_eager(q_BHTK, k_BHTK, v_BHTV, block_mask, scale: float):
    """FlexAttention's eager reference (dense scores, the BlockMask's mask_mod applied to every pair), forward and
    backward, off CUDA.

    NOTE: torch 2.13's public ``flex_attention`` refuses inputs that require grad on CPU, eager or compiled
    ("FlexAttention does not support backward on CPU"); the operator it calls has an eager autograd reference
    that runs on CPU, so CPU tests (and CPU runs with model.attn.backend=flex) get gradients through it.
    """
    from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_op
    from torch.nn.attention.flex_attention import _apply_kernel_options

    options = _apply_kernel_options(q_BHTK, k_BHTK, v_BHTV, False, None, None)
    out, _lse, _max = flex_attention_op(q_BHTK, k_BHTK, v_BHTV, _identity_score, block_mask.as_tuple(), scale,
                                        options)
    return out
