"""Distributed checkpoints: save, find the newest complete one, load; crash- and preemption-safe.

A checkpoint is a directory ``<checkpoint.dir>/step_<NNNNNNNN>/`` holding

- the model and optimizer states through ``torch.distributed.checkpoint`` (sharded per rank, reshardable: the
  state is keyed by fully-qualified parameter names, whatever the data-parallel layout);
- ``trainer_state.json`` (step, tokens, loader state) and ``config.yaml`` (the resolved run config);
- ``rng/rank_<r>.safetensors``, each rank's torch RNG states;
- ``COMPLETE``, written last by rank 0 after every rank has finished, listing every file and its size.

Everything is written under ``step_<N>.partial/`` first and renamed to ``step_<N>/`` once complete, so a crash
never damages an existing checkpoint. Only a checkpoint with a valid ``COMPLETE`` counts; older ones are pruned
only after a newer one is complete.
Loading never unpickles arbitrary code (JSON, safetensors, and DCP through :class:`SafeFileSystemReader`).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_model_state_dict, set_state_dict

from moetrain.checkpoint.safe_reader import SafeFileSystemReader

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
_PREFIX = "step_"
# Fault injection for the crash tests: die (SIGKILL) after the tensors are written but before COMPLETE.
FAULT_ENV = "MOETRAIN_FAULT_INJECT"


class CheckpointError(RuntimeError):
    pass


def step_dir(root: Path, step: int) -> Path:
    return root / f"{_PREFIX}{step:08d}"


def partial_dir(root: Path, step: int) -> Path:
    """Where a checkpoint is written until it is complete; resume never looks here."""
    return root / f"{_PREFIX}{step:08d}.partial"


def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def safe_reader(path: Path) -> SafeFileSystemReader:
    """A reader for ``path`` whose metadata has been checked up front, so that a refusal is a plain error."""
    reader = SafeFileSystemReader(str(path))
    try:
        reader.read_metadata()
    except (pickle.UnpicklingError, EOFError, FileNotFoundError) as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from e
    return reader


def write_complete_marker(path: Path, step: int, world_size: int) -> None:
    """Mark ``path`` complete (atomically), recording the size of every file for later integrity checks."""
    files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
    tmp = path / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps({"step": step, "world_size": world_size, "files": files}, indent=1))
    os.replace(tmp, path / COMPLETE)


def save_model_checkpoint(path: Path, model, config_yaml: str) -> None:
    """A model-only checkpoint (one process), e.g. converted from Hugging Face: same layout, step 0."""
    path.mkdir(parents=True, exist_ok=False)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(path), no_dist=True)
    (path / TRAINER_STATE).write_text(json.dumps({"step": 0, "kind": "model"}))
    (path / "config.yaml").write_text(config_yaml)
    write_complete_marker(path, 0, 1)


def load_model_weights(path: Path, model) -> None:
    """Fill ``model`` (a full, single-process model) with the model part of checkpoint ``path``."""
    state = {"model": model.state_dict()}
    dcp.load(state, storage_reader=safe_reader(path), no_dist=True)
    model.load_state_dict(state["model"])


def verify_complete(path: Path) -> str | None:
    """None if ``path`` is a complete, intact checkpoint, else the reason (naming the file)."""
    marker = path / COMPLETE
    if not marker.exists():
        return f"{marker} is missing (the save did not finish)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        return f"{marker} is unreadable ({e})"
    for rel, size in files.items():
        f = path / rel
        if not f.exists():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes, {COMPLETE} recorded {size} (truncated or corrupt)"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under ``root``, newest first."""
    if not root.exists():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)
                   and p.name[len(_PREFIX):].isdigit()), key=lambda p: int(p.name[len(_PREFIX):]), reverse=True)


def newest_complete(root: Path, warn: Callable[[str], None]) -> Path | None:
    for path in list_checkpoints(root):
        problem = verify_complete(path)
        if problem is None:
            return path
        warn(f"checkpoint: skipping {path.name}: {problem}")
    return None


def resolve_checkpoint(path: str | os.PathLike, warn: Callable[[str], None] = print) -> Path:
    """A checkpoint directory, or a ``checkpoint.dir`` meaning its newest complete checkpoint."""
    path = Path(path)
    if (path / COMPLETE).exists() or (path / ".metadata").exists():
        problem = verify_complete(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} is not usable: {problem}")
        return path
    found = newest_complete(path, warn)
    if found is None:
        raise CheckpointError(f"{path}: no complete checkpoint found")
    return found


class CheckpointManager:
    def __init__(self, root: str | os.PathLike, keep_last: int, rank: int, world_size: int,
                 log: Callable[[str], None], async_save: bool = False):
        self.root, self.keep_last = Path(root), keep_last
        self.rank, self.world_size, self.log = rank, world_size, log
        self.async_save = async_save
        # Background saves run their collectives on their own gloo group, away from training's.
        self.group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        self._pending: tuple[int, Path, object] | None = None  # (step, path, future) of a background save

    # ----------------------------------------------------------------------------------------------- save
    def save(self, step: int, model, optimizer, trainer_state: dict, config_yaml: str) -> Path:
        """Write a checkpoint of ``step``; with async_save the tensors are written in the background."""
        self.wait()
        path = partial_dir(self.root, step)
        if self.rank == 0:
            if path.exists():  # an earlier attempt at the same step that crashed during its save
                shutil.rmtree(path)
            (path / "rng").mkdir(parents=True)
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        save_file(_rng_state(), str(path / "rng" / f"rank_{self.rank}.safetensors"))
        if self.rank == 0:
            (path / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
            (path / "config.yaml").write_text(config_yaml)
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(path), process_group=self.group,
                                    no_dist=not dist.is_initialized())
            self._pending = (step, path, future)
        else:
            dcp.save(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
            self._finalize(step, path)
        return path

    def wait(self) -> None:
        """Finish a background save: wait for its writes, then mark it complete."""
        if self._pending is None:
            return
        step, path, future = self._pending
        self._pending = None
        future.result()
        self._finalize(step, path)

    def _finalize(self, step: int, path: Path) -> None:
        if os.environ.get(FAULT_ENV) == "kill_during_save":
            os.kill(os.getpid(), signal.SIGKILL)
        _barrier()
        final = step_dir(self.root, step)
        if self.rank == 0:
            write_complete_marker(path, step, self.world_size)
            if final.exists():  # e.g. a run resumed from an older checkpoint reached this step again
                trash = final.with_name(final.name + ".replaced")
                os.replace(final, trash)
                os.replace(path, final)
                shutil.rmtree(trash)
            else:
                os.replace(path, final)
            self._prune(keep=final)
            self.log(f"checkpoint: saved {final}")
        _barrier()

    def _prune(self, keep: Path) -> None:
        """Drop all but the newest ``keep_last`` complete checkpoints, and incomplete ones older than ``keep``."""
        complete = [p for p in list_checkpoints(self.root) if verify_complete(p) is None]
        for old in complete[self.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
        stale = [p for p in list_checkpoints(self.root) if p not in complete]
        stale += list(self.root.glob(f"{_PREFIX}*.partial"))
        for p in stale:
            if p.name < keep.name:
                shutil.rmtree(p, ignore_errors=True)

    # ----------------------------------------------------------------------------------------------- load
    def find_resume(self, resume: str) -> Path | None:
        """The checkpoint to resume from for ``checkpoint.resume`` (auto | none | a path), saying which and why."""
        if resume == "none":
            return None
        if resume != "auto":
            path = resolve_checkpoint(resume, self._warn)
            newer = [p.name for p in list_checkpoints(self.root) if p.name > path.name]
            if newer:
                self._warn(f"checkpoint.resume={resume}: {self.root} also holds newer checkpoints {newer[:3]}; a "
                           "later checkpoint.resume=auto would pick those, so consider a new checkpoint.dir")
            return path
        found = newest_complete(self.root, self._warn)
        if found is None:
            self.log(f"checkpoint: no complete checkpoint in {self.root}; starting from scratch")
        else:
            self.log(f"checkpoint: resuming from {found} (newest complete checkpoint in {self.root})")
        return found

    def load(self, path: Path, model, optimizer) -> dict:
        """Restore model, optimizer and RNG from ``path``; returns its trainer state.

        A model-only checkpoint (``moetrain convert --from-hf``) restores the weights alone.
        """
        trainer_state = json.loads((path / TRAINER_STATE).read_text())
        model_sd, optim_sd = get_state_dict(model, optimizer)
        if trainer_state.get("kind") == "model":
            state = {"model": model_sd}
            dcp.load(state, storage_reader=safe_reader(path), no_dist=not dist.is_initialized())
            set_model_state_dict(model, state["model"])
            return trainer_state
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, storage_reader=safe_reader(path), no_dist=not dist.is_initialized())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng = path / "rng" / f"rank_{self.rank}.safetensors"
        saved_world = json.loads((path / COMPLETE).read_text())["world_size"]
        if rng.exists() and saved_world == self.world_size:
            _set_rng_state(load_file(str(rng)))
        else:
            self._warn(f"checkpoint: {path.name} was saved by {saved_world} ranks, this run has {self.world_size}: "
                       "RNG states start fresh (the data order and parameters resume exactly)")
        return json.loads((path / TRAINER_STATE).read_text())

    def _warn(self, message: str) -> None:
        if self.rank == 0:
            warnings.warn(message, stacklevel=3)
            self.log(f"WARNING: {message}")


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
