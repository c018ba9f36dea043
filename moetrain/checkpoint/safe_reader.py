"""Reading ``torch.distributed.checkpoint`` data without unpickling anything beyond an allow-list.

DCP uses pickle in two places on load, and both are guarded here:

- ``.metadata`` is unpickled by :class:`SafeFileSystemReader` with an exact allow-list of (module, name) pairs:
  the data classes DCP's metadata is made of, torch.Size, dtypes, plain containers, paths. Dotted names (which
  would reach e.g. ``os.system`` through a module's imports) and everything else are refused.
- every non-tensor item (optimizer hyperparameters such as ``optim.param_groups.0.lr``) is read by
  :class:`SafeLoadPlanner` with ``torch.load(weights_only=True)`` and must then be a plain value (numbers,
  strings, None, tensors, and lists/tuples/dicts of those). DCP's own planner uses ``weights_only=False`` there.

Tensor data is read by DCP itself with ``torch.load(weights_only=True)``. :func:`load_state` is the one way the
package calls ``dcp.load``; a refusal is a :class:`CheckpointError` naming the checkpoint and the file or item.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta

from moetrain._compat import dcp_set_element


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used or written; the message names the path (and file or item) at fault."""


# Classes defined in DCP's metadata module are plain data (dataclasses and one enum).
_METADATA_CLASSES = {(dcp_metadata.__name__, n) for n, v in vars(dcp_metadata).items()
                     if isinstance(v, type) and v.__module__ == dcp_metadata.__name__}
_ALLOWED = _METADATA_CLASSES | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "tuple"),
    ("builtins", "list"), ("builtins", "dict"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}


class _Refused(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and "." not in name and isinstance(
                getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise _Refused(f"{self.where}: refusing to unpickle {module}.{name} (not checkpoint metadata)")


def read_metadata_file(path: Path) -> dcp_metadata.Metadata:
    """Unpickle a DCP ``.metadata`` file with the allow-list; any failure is a CheckpointError naming it."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, str(path)).load()
    except _Refused as e:
        raise CheckpointError(f"checkpoint metadata {e}") from e
    except Exception as e:  # damaged pickles raise many types (EOFError, ValueError, KeyError, ...)
        raise CheckpointError(f"checkpoint metadata {path} is unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CheckpointError(f"checkpoint metadata {path} holds a {type(metadata).__name__}, not DCP metadata")
    # DCP opens <checkpoint>/<relative_path>: only plain names inside the directory, which COMPLETE's sizes and
    # checksums cover ("../other/__0_0.distcp" or an absolute path would escape them).
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise CheckpointError(f"checkpoint metadata {path} names storage file {name!r}, not a plain file name "
                                  "in the checkpoint directory")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        metadata = read_metadata_file(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _is_plain(obj) -> bool:
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.Tensor)):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_is_plain(x) for x in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, (str, int)) and _is_plain(v) for k, v in obj.items())
    return False


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that a non-tensor item must unpickle as a plain value."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        key = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"checkpoint {self.where}: refusing to unpickle item {key!r} "
                                  f"({_why_refused(e)})") from e
        if not _is_plain(obj):
            raise CheckpointError(f"checkpoint {self.where}: refusing item {key!r}: a {type(obj).__name__}, "
                                  "not a plain value")
        if self.flatten_state_dict:
            dcp_set_element(self.original_state_dict, self.mappings[key], obj)  # as DefaultLoadPlanner.load_bytes
        else:
            self.state_dict[key] = obj


def _why_refused(e: Exception) -> str:
    """The line of torch's weights-only error that names the refused global, else the error's first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "Unsupported global" in ln or "WeightsUnpickler error" in ln:
            return ln.split("WeightsUnpickler error:")[-1].strip()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def safe_reader(path: Path) -> SafeFileSystemReader:
    """A reader for ``path`` whose metadata has been checked up front, so that a refusal is a plain error."""
    reader = SafeFileSystemReader(str(path))
    reader.read_metadata()
    return reader


def load_state(state: dict, path: Path, no_dist: bool) -> None:
    """``dcp.load`` of ``state`` (in place) from checkpoint ``path``, through the safe reader and planner."""
    try:
        dcp.load(state, storage_reader=safe_reader(path), planner=SafeLoadPlanner(str(path)), no_dist=no_dist)
    except CheckpointException as e:
        # DCP wraps every rank's failure; surface ours (or a Ctrl-C) instead of its traceback dump.
        cause = find_exception(e, (CheckpointError, KeyboardInterrupt))
        if cause is not None:
            raise cause from None
        raise


def find_exception(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of ``kinds`` in ``exc``, its cause/context chain, or a DCP failure it wraps."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kinds):
            return e
        if isinstance(e, CheckpointException):
            todo += [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        todo += [e.__cause__, e.__context__]
    return None
