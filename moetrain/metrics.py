"""Training metrics and their sinks (rank 0 only): a step line with progress and ETA on the console and in train.log,
JSONL, and wandb (one wandb run per run directory, list values as one scalar per index)."""

from __future__ import annotations

import json
import math
import os
import resource
import secrets
import sys
import time
from pathlib import Path

import torch

from moetrain.config import LoggingConfig
from moetrain.model.config import ConfigError


def memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or this process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


class MetricsLogger:
    def __init__(self, cfg: LoggingConfig, run_dir: Path, total_steps: int, enabled: bool, job_config: dict):
        self.cfg, self.total_steps, self.enabled = cfg, total_steps, enabled
        self.run_dir, self.job_config = Path(run_dir), job_config
        self.start, self.start_step = time.perf_counter(), 0
        self._jsonl = None
        self._wandb = None
        self._tensorboard = None

    def begin(self, step: int) -> None:
        """Open the sinks once the run starts at ``step`` (0, or the step it resumes from), and start the ETA clock.

        Records of steps after ``step`` (logged by an earlier attempt after its last checkpoint) are moved out of
        metrics.jsonl into metrics.replaced.jsonl, so metrics.jsonl holds each trained step once.
        """
        self.start, self.start_step = time.perf_counter(), step
        if not self.enabled or self._jsonl is not None or self._wandb is not None or self._tensorboard is not None:
            return
        if self.cfg.jsonl:
            path = self.run_dir / "metrics.jsonl"
            _move_records_after(path, step, self.run_dir / "metrics.replaced.jsonl")
            self._jsonl = open(path, "a", buffering=1)
        if self.cfg.tensorboard.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("logging.tensorboard.enabled", f"needs the tensorboard package ({e}): "
                                                                 "pip install tensorboard") from None
            self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=step + 1)
        if self.cfg.wandb.enabled and self.cfg.wandb.mode != "disabled":
            import wandb

            # A resumed, requeued or resubmitted job continues its wandb run; a run that starts from step 0 (in a
            # new run.dir, or with checkpoint.resume=none) gets a new one.
            self._wandb = wandb.init(project=self.cfg.wandb.project, entity=self.cfg.wandb.entity,
                                     name=self.cfg.wandb.name or self.run_dir.name, mode=self.cfg.wandb.mode,
                                     dir=str(self.run_dir), config=self.job_config,
                                     id=wandb_run_id(self.run_dir, new=step == 0), resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if self._jsonl:
            self._jsonl.write(json.dumps(record) + "\n")
        scalars, matrices = _flat({k: v for k, v in record.items() if not _is_matrix(v)}), _per_row(record)
        if self._wandb is not None:
            import wandb

            self._wandb.log({**scalars, **{k: wandb.Histogram(row) for k, row in matrices.items()}}, step=step)
        if self._tensorboard is not None:
            for key, value in scalars.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tensorboard.add_scalar(key, value, step)
            for key, row in matrices.items():
                self._tensorboard.add_histogram(key, torch.tensor(row, dtype=torch.float64), step)
        line = self._console_line(step, metrics)  # formatted from the numbers themselves: nan and inf print as such
        with open(self.run_dir / "train.log", "a") as f:
            f.write(line + os.linesep)
        if self.cfg.console:
            print(line, file=sys.stdout, flush=True)

    def _console_line(self, step: int, r: dict) -> str:
        done = step / self.total_steps
        bar = ("=" * int(20 * done)).ljust(20)
        elapsed = time.perf_counter() - self.start
        per_step = elapsed / max(step - self.start_step, 1)
        eta = _hms(per_step * (self.total_steps - step))
        parts = [f"step {step}/{self.total_steps} [{bar}] {100 * done:3.0f}%", f"loss {r['loss']:.4f}"]
        if "val_loss" in r:
            parts.append(f"val {r['val_loss']:.4f}")
        parts += [f"lm {r['lm_loss']:.4f}", f"mtp {r['mtp_loss']:.4f}", f"bal {r['balance_loss']:.2e}",
                  f"lr {r['lr']:.2e}", f"gnorm {r['grad_norm']:.3f}", f"{r['tokens_per_s'] / 1e3:.1f}k tok/s"]
        if r.get("mfu") is not None:
            parts.append(f"mfu {100 * r['mfu']:.1f}%")
        parts.append(f"maxvio {r['max_violation']:.3f}")
        if r.get("routing_ranks_per_token") is not None:  # expert parallelism: all-to-all fan-out per token
            parts.append(f"ranks/tok {r['routing_ranks_per_token']:.2f}")
        parts += [f"mem {r['memory_gb']:.2f}GB", f"eta {eta}"]
        return " | ".join(parts)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def wandb_run_id(run_dir: Path, new: bool = False) -> str:
    """The run's wandb id, kept in ``run_dir/wandb_run_id``: a fresh random one when ``new`` or none is kept."""
    path = Path(run_dir) / "wandb_run_id"
    if not new and path.exists():
        return path.read_text().strip()
    run_id = secrets.token_hex(8)
    path.write_text(run_id + "\n")
    return run_id


def _flat(record: dict) -> dict:
    """List values (MaxVio per layer, bubble per pipeline rank) as one scalar per index: ``key/i``."""
    out = {}
    for k, v in record.items():
        if isinstance(v, list):
            out.update({f"{k}/{i}": x for i, x in enumerate(v)})
        else:
            out[k] = v
    return out


def _is_matrix(value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], list)


def _per_row(record: dict) -> dict[str, list]:
    """Lists of lists (tokens per expert of each MoE layer) as one histogram per row, ``key/moe_layer_i``: a
    DeepSeek-V3 has 58 x 256 of them, too many for one scalar each."""
    return {f"{k}/moe_layer_{i}": row for k, v in record.items() if _is_matrix(v) for i, row in enumerate(v)}


def _move_records_after(path: Path, step: int, replaced: Path) -> None:
    """Keep the records of steps <= ``step`` in ``path`` (rewritten atomically); append the rest to ``replaced``."""
    if not path.exists():
        return
    keep, moved = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            later = json.loads(line).get("step", 0) > step
        except (json.JSONDecodeError, AttributeError):
            later = True  # a torn last line of a crashed run
        (moved if later else keep).append(line if line.endswith("\n") else line + "\n")
    if not moved:
        return
    with open(replaced, "a") as f:
        f.writelines(moved)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.tolist() if v.numel() > 1 else v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def log_text(run_dir: Path, line: str, enabled: bool) -> None:
    """A plain log line on the console and in run_dir/train.log (rank 0 only)."""
    if not enabled:
        return
    print(line, flush=True)
    with open(Path(run_dir) / "train.log", "a") as f:
        f.write(line + os.linesep)
