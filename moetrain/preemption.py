"""Stopping on a signal: SIGTERM or SIGUSR1 (Slurm's warning before the time limit) asks every rank to checkpoint
at the next step and exit; the launcher learns that the checkpoint is complete from ``MOETRAIN_PREEMPTED_FILE``."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, device: torch.device, world_size: int):
        self.device, self.world_size = device, world_size
        self.signum: int | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only

        def request_stop(signum, frame):
            self.signum = signum

        for sig in STOP_SIGNALS:
            signal.signal(sig, request_stop)

    def requested(self) -> bool:
        """Whether any rank got a signal (every rank stops at the same step)."""
        flag = torch.tensor(float(self.signum is not None), device=self.device)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def mark_preempted(step: int, run_dir: Path) -> None:
    """Stopped by a signal with the checkpoint complete: tell the launcher (launch/slurm.sbatch requeues only then)
    through the file ``MOETRAIN_PREEMPTED_FILE`` names, if it names one. Rank 0 only."""
    path = os.environ.get("MOETRAIN_PREEMPTED_FILE")
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{step} {run_dir.resolve()}\n")
        os.replace(tmp, path)
