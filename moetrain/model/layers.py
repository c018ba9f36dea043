"""Small building blocks: RMSNorm, the SwiGLU feed-forward network, and the activation recomputation primitive.

Shapes: B batch, T tokens per sequence, D model dim, F FFN width.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moetrain._compat import compile_disabled

# Per thread: autograd runs CUDA backward (and so recomputation) on its own threads, beside the next forwards.
_recompute_state = threading.local()


def is_recomputing() -> bool:
    """True while a forward runs again, or on placeholder inputs, and its side effects must not count: inside
    :func:`recomputed`'s backward, or a pipeline stage's shape inference (see :func:`replaying`).

    Forward side effects (token counts, balance-loss metrics) check it so that they happen once per real forward.
    """
    return getattr(_recompute_state, "active", False)


class replaying:  # noqa: N801 (a context manager used like a function)
    """Forwards inside do not count (:func:`is_recomputing` is true). Re-enterable: a schedule that splits
    backward into input and weight gradients recomputes a checkpointed block twice with the same context."""

    def __init__(self):
        self._saved: list[bool] = []

    def __enter__(self):
        self._saved.append(is_recomputing())
        _recompute_state.active = True

    def __exit__(self, *exc):
        _recompute_state.active = self._saved.pop()


def _recompute_contexts():
    return contextlib.nullcontext(), replaying()


@compile_disabled(recursive=False)  # dynamo cannot trace a custom context_fn; fn itself still compiles
def recomputed(fn, *args, checkpoint_fn=None):
    """``fn(*args)`` keeping only its inputs; backward re-runs it with :func:`is_recomputing` true.

    Every activation recomputation of the model goes through here (wrappers applied from outside must do the same).
    ``checkpoint_fn``: called as ``torch.utils.checkpoint.checkpoint`` (the default) is, with ``use_reentrant=False``
    and ``context_fn``; a precision provider may supply its own (Transformer Engine's restores its FP8 state).
    """
    return (checkpoint_fn or checkpoint)(fn, *args, use_reentrant=False, context_fn=_recompute_contexts)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back to the input dtype before the weight (as DeepSeek and HF do)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.recompute = False  # set by moetrain.parallel.recompute (selective): keep no fp32 intermediates
        self.checkpoint_fn = None  # set with it: recomputed()'s checkpoint_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            return recomputed(self._norm, x, checkpoint_fn=self.checkpoint_fn)
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU FFN ``w2(silu(w1 x) * w3 x)``: the dense layers and the shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_TD)) * self.w3(x_TD))


def uninitialised(cls: type[nn.Module]) -> nn.Module:
    """A ``cls`` with nn.Module's state but without ``cls.__init__``: for modules made to share another module's
    parameters (an FP8 swap, a pipeline stage), which set their attributes themselves."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    return new
