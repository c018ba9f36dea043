"""Stopping on a signal: SIGTERM or SIGUSR1 (Slurm's warning before the time limit) asks every rank to checkpoint
at the next step and exit; the launcher learns that the checkpoint is complete from ``MOETRAIN_PREEMPTED_FILE``."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """The signal this rank received, if any (the trainer sums the flags of all ranks with the step's losses, so
    that every rank stops after the same step)."""

    def __init__(self):
        self.signum: int | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only

        def request_stop(signum, frame):
            self.signum = signum

        for sig in STOP_SIGNALS:
            signal.signal(sig, request_stop)


def mark_preempted(step: int, run_dir: Path) -> None:
    """Stopped by a signal with the checkpoint complete: tell the launcher (launch/slurm.sbatch requeues only then)
    through the file ``MOETRAIN_PREEMPTED_FILE`` names, if it names one. Rank 0 only."""
    path = os.environ.get("MOETRAIN_PREEMPTED_FILE")
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{step} {run_dir.resolve()}\n")
        os.replace(tmp, path)
