"""The run directory belongs to one run at a time: an exclusive lock held by rank 0 for the run's life.

The lock is ``flock`` on ``run.dir/.lock`` (kept by the kernel for the open file, so it is released when the
process exits or dies, SIGKILL included; on NFS Linux maps it to a POSIX lock). The file also records the
holder (host, pid, start time), so a refused run can name it, and a lock file left by a dead process is
recognised as stale (the file exists but nobody holds the lock) and taken over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
import warnings
from pathlib import Path

LOCK_FILE = ".lock"


class RunDirLocked(RuntimeError):
    """Another process is training in this run directory."""


class RunDirLock:
    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self._file = None
        self.stale_holder: dict | None = None  # set when a dead run's lock file was taken over

    def acquire(self) -> "RunDirLock":
        """Take the lock or raise :class:`RunDirLocked` naming the holder."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")
        except OSError as e:
            raise RunDirLocked(f"run.dir {self.path.parent}: cannot create {self.path} ({e.strerror}); choose a "
                               "writable run.dir") from e
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(f)
            f.close()
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise RunDirLocked(
                    f"run.dir {self.path.parent} is in use by another run (host {holder.get('host', '?')}, pid "
                    f"{holder.get('pid', '?')}, since {holder.get('started', '?')}); wait for it to finish, stop it, "
                    "or choose another run.dir") from None
            raise RunDirLocked(f"run.dir {self.path.parent}: cannot lock {self.path} ({e.strerror}); the file "
                               "system does not support locks, so two runs could share this directory") from e
        previous = _read_holder(f)
        if previous.get("pid") is not None:
            self.stale_holder = previous  # it held the file, not the lock: its process is gone
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        """Drop the lock; the file stays empty so a later run does not mistake it for a stale holder."""
        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()
        self._file.flush()
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None


def _read_holder(f) -> dict:
    f.seek(0)
    try:
        return json.loads(f.read() or "{}")
    except json.JSONDecodeError:
        return {}


class _LazyFileHandler(logging.FileHandler):
    """A FileHandler whose file (and folder) appear with the first record."""

    def __init__(self, path: Path):
        super().__init__(path, delay=True)

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


class RankLog:
    """``run.dir/logs/rank_<r>.log``: every rank's warnings (a copy; the console still shows them) and the
    traceback of an error that stops it, so a failure on rank 37 of 512 is not only in a scheduler's stderr."""

    def __init__(self, run_dir: str | os.PathLike, rank: int):
        path = Path(run_dir) / "logs" / f"rank_{rank}.log"
        self.logger = logging.getLogger(f"moetrain.rank{rank}")
        self.logger.propagate = False  # not on the console: the console has its own one-line error
        self.handler = _LazyFileHandler(path)  # the file appears with the first record: a quiet run leaves none
        self.handler.setFormatter(logging.Formatter(f"%(asctime)s rank {rank} %(levelname)s %(message)s"))
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO)
        self._show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            self.logger.warning(warnings.formatwarning(message, category, filename, lineno, line).rstrip())
            self._show(message, category, filename, lineno, file, line)

        warnings.showwarning = show

    def info(self, message: str) -> None:
        self.logger.info(message)

    def error(self, message: str) -> None:
        self.logger.exception(message)

    def close(self) -> None:
        warnings.showwarning = self._show
        self.logger.removeHandler(self.handler)
        self.handler.close()


class RunDirOwner:
    """This job's hold on run.dir across its ranks: rank 0 takes the lock before anything is written and every
    rank learns whether it did; the resolved config is written only once training starts, so a refused or failed
    run overwrites nothing; a run that created run.dir and never started removes it again."""

    def __init__(self, run_dir: str | os.PathLike, rank: int, world_size: int, device, log):
        self.run_dir, self.is_main = Path(run_dir), rank == 0
        self._created = self.is_main and not self.run_dir.exists()
        self.started = False
        self._lock = self._acquire(world_size, device, log)
        # run.dir/logs/rank_<r>.log, written when needed; only once the lock is this run's.
        self.rank_log = RankLog(self.run_dir, rank)

    def _acquire(self, world_size: int, device, log) -> RunDirLock | None:
        lock, refusal = None, None
        if self.is_main:
            try:
                lock = RunDirLock(self.run_dir).acquire()
            except RunDirLocked as e:
                refusal = e
        if world_size > 1:
            import torch
            import torch.distributed as dist

            flag = torch.tensor(float(refusal is not None), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and refusal is None:
                refusal = RunDirLocked(f"run.dir {self.run_dir} is in use by another run (see rank 0)")
        if refusal is not None:
            raise refusal
        if lock is not None and lock.stale_holder:
            holder = lock.stale_holder
            log(f"run.dir: taking over from a run that ended without releasing it (host {holder.get('host')}, "
                f"pid {holder.get('pid')})")
        return lock

    def start(self, config_yaml: str) -> None:
        """The run is accepted: record its resolved config (atomically)."""
        if self.is_main and not self.started:
            tmp = self.run_dir / "config.yaml.tmp"
            tmp.write_text(config_yaml)
            os.replace(tmp, self.run_dir / "config.yaml")
        self.started = True

    def release(self) -> None:
        """Release run.dir; if this run created it and never started, remove it."""
        self.rank_log.close()
        if self._created and not self.started:  # still locked: no other run can have taken it over
            import shutil

            shutil.rmtree(self.run_dir, ignore_errors=True)
        if self._lock is not None:
            self._lock.release()
