"""The training program: ``moetrain train [overrides]`` or ``python -m moetrain.train [overrides]``: Hydra's
entry, user errors as one line with an exit status, and :func:`run` (the loop itself: moetrain.trainer)."""

from __future__ import annotations

import gc
import os
import sys

import hydra
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record

from moetrain.config import JobConfig, register_configs, to_job_config
from moetrain.errors import TrainingDiverged, user_error
from moetrain.parallel.dist import adopt_slurm_ranks, destroy, finish
from moetrain.resources import conf_dir
from moetrain.trainer import Trainer

__all__ = ["Trainer", "TrainingDiverged", "main", "run"]


def run(job: JobConfig) -> list[float]:
    trainer = None
    try:
        trainer = Trainer(job)
        trainer.resume_or_init()
        losses = trainer.fit()
        finish()  # every rank done with its last message before any tears the process group down
        return losses
    finally:
        # The trainer (pipeline stages and their communicators among it) goes before the process group.
        trainer = None
        gc.collect()
        destroy()


register_configs()


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    # Errors are handled here, not around Hydra, which would first print "Error executing job ...".
    try:
        _per_job_run_dir(cfg)
        job = to_job_config(cfg)
    except Exception as e:
        _exit_on_user_error(e, composing=True)
        raise
    try:
        run(job)
    except Exception as e:
        _exit_on_user_error(e, composing=False)
        raise


def _per_job_run_dir(cfg: DictConfig) -> None:
    """In a Hydra sweep (``moetrain train -m a=1,2``) with one run.dir given, each job trains in a folder of it
    named by the job's own overrides (sharing one, a job would resume another's checkpoint; named by position, a
    later sweep with other values would). The default run.dir already differs per job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from moetrain.config import overrides_name

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    overrides = list(HydraConfig.get().overrides.task)
    if any(o.startswith("run.dir=") for o in overrides):
        cfg.run.dir = f"{cfg.run.dir}/{overrides_name(overrides) or 'default'}"


@record  # under torchrun, a worker's traceback reaches torchrun's failure summary
def main() -> None:
    """``moetrain train``: Hydra's entry, with user errors as one line and an exit status instead of a traceback
    (``HYDRA_FULL_ERROR=1`` shows the traceback)."""
    global _FULL_ERROR
    adopt_slurm_ranks()  # srun, one task per GPU: Slurm's variables stand in for torchrun's
    _quiet_library_warnings()
    _FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # composition errors reach us instead of Hydra's multi-line report
    try:
        _hydra_main()
    except Exception as e:  # Hydra's own composition (overrides, presets) fails before _hydra_main runs
        _exit_on_user_error(e, composing=True)
        raise
    finally:
        if not _FULL_ERROR:
            os.environ.pop("HYDRA_FULL_ERROR", None)


_FULL_ERROR = False


def _quiet_library_warnings() -> None:
    """Library warnings that say nothing to a moetrain user stay off the console (moetrain's own still show)."""
    import warnings

    # DCP in one process (no process group), which is how moetrain runs single-process training on purpose.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)


def _exit_on_user_error(e: Exception, composing: bool) -> None:
    """Print a user error as one line (rank 0 for config errors, the failing rank otherwise) and exit."""
    status, message = user_error(e, composing)
    if status is None or _FULL_ERROR:
        return
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 or status == 1:  # config errors are the same on every rank; run errors may be one rank's
        prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"moetrain: {prefix}error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
