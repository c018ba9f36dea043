"""Counting the operations that make a GPU wait for the host (or the host for the GPU): a read of a device value
(``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``) and the ops whose output size depends on the data
(``nonzero``, ``bincount``, ``unique``, ``masked_select``, boolean-mask indexing). Counted on any device, so the
CPU tests hold the GPU path to its budget; on CUDA ``torch.cuda.set_sync_debug_mode`` reports the same.

Ops run inside ``torch.optim.Optimizer.step`` are not counted (torch's own business: its step counter).

    with HostSyncCounter() as syncs:
        trainer.train_step()
    syncs.total, syncs.by_op   # e.g. 1, {"tolist": 1}
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

from moetrain._compat import TorchDispatchMode

_SYNC_OPS = {
    "aten._local_scalar_dense.default": "item",
    "aten.nonzero.default": "nonzero",
    "aten.bincount.default": "bincount",
    "aten._unique2.default": "unique",
    "aten.unique_dim.default": "unique",
    "aten.unique_consecutive.default": "unique",
    "aten.masked_select.default": "masked_select",
}


def _bool_index(func, args) -> bool:
    return str(func) == "aten.index.Tensor" and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()))


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: "HostSyncCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _SYNC_OPS.get(str(func)) or ("bool_index" if _bool_index(func, args) else None)
        if name is not None:
            self.counter._count(name)
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    """``Tensor.tolist`` never reaches the dispatcher: it is seen here, and its own scalar reads are not counted."""

    def __init__(self, counter: "HostSyncCounter"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            self.counter._count("tolist")
            with self.counter.paused():
                return func(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class HostSyncCounter:
    def __init__(self):
        self.by_op: Counter[str] = Counter()
        self._paused = 0
        self._hooks = []

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def _count(self, name: str) -> None:
        if not self._paused:
            self.by_op[name] += 1

    def paused(self):
        counter = self

        class _Paused:
            def __enter__(self):
                counter._paused += 1

            def __exit__(self, *exc):
                counter._paused -= 1

        return _Paused()

    def reset(self) -> None:
        self.by_op.clear()

    def __enter__(self) -> "HostSyncCounter":
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        def pause(*_):
            self._paused += 1

        def resume(*_):
            self._paused -= 1

        self._hooks = [register_optimizer_step_pre_hook(pause), register_optimizer_step_post_hook(resume)]
        self._modes = [_Function(self), _Dispatch(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        for hook in self._hooks:
            hook.remove()
