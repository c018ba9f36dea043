"""``train.profile``: a torch.profiler trace (and on GPU a CUDA memory snapshot) of a window of steps.

The trace of steps [a, b] on each chosen rank is ``run.dir/profile/rank_<r>_steps_<a>-<b>.json`` (Chrome trace
format: chrome://tracing or https://ui.perfetto.dev); the memory snapshot ``....pickle`` opens in
https://pytorch.org/memory_viz.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moetrain._compat import dump_cuda_memory_snapshot, record_cuda_memory_history
from moetrain.config import ProfileConfig


class StepProfiler:
    def __init__(self, cfg: ProfileConfig, rank: int, run_dir: Path, device: torch.device):
        self.enabled = bool(cfg.steps) and rank in cfg.ranks
        self.first, self.last = (cfg.steps or [0, 0])
        self.memory = cfg.memory and device.type == "cuda"
        self.device = device
        self.path = Path(run_dir) / "profile" / f"rank_{rank}_steps_{self.first}-{self.last}"
        self._prof = None

    def step_begin(self, step: int) -> None:
        if not self.enabled or step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        if self.memory:
            record_cuda_memory_history(True)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
        self._prof.__enter__()

    def step_end(self, step: int) -> str | None:
        """After step ``step``: the trace's path once the window closes, else None."""
        if self._prof is None or step != self.last:
            return None
        self._prof.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._prof.export_chrome_trace(str(self.path) + ".json")
        self._prof = None
        if self.memory:
            dump_cuda_memory_snapshot(str(self.path) + ".pickle")
            record_cuda_memory_history(False)
        return str(self.path) + ".json"

    def close(self) -> None:
        """A run that ends inside the window still writes what it has."""
        if self._prof is not None:
            self.step_end(self.last)
