"""Process-group setup from the launcher's environment (torchrun, Slurm via torchrun/srun)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def adopt_slurm_ranks(environ=os.environ) -> bool:
    """``srun`` with one task per GPU (no torchrun): take RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous from
    Slurm's step variables. Nothing when torchrun's RANK is set or the process is not one of several srun tasks
    (a batch script's own shell has no SLURM_STEP_NUM_TASKS). Returns whether it did."""
    tasks = int(environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if "RANK" in environ or tasks < 2 or "SLURM_PROCID" not in environ:
        return False
    environ.update(RANK=environ["SLURM_PROCID"], WORLD_SIZE=str(tasks), LOCAL_RANK=environ.get("SLURM_LOCALID", "0"))
    if "MASTER_ADDR" not in environ:
        environ["MASTER_ADDR"] = first_host(environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"])
    # The same port on every task, different for each job step, below Linux's ephemeral ports (32768+).
    job, step = int(environ["SLURM_JOB_ID"]), int(environ.get("SLURM_STEP_ID", "0") or 0)
    environ.setdefault("MASTER_PORT", environ.get("MOETRAIN_PORT") or str(10000 + (job * 7 + step) % 20000))
    return True


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (``gpu[003-010,012],cpu01`` -> ``gpu003``), without ``scontrol``
    (absent in many containers)."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[:nodelist.index("]") + 1]
    if "[" not in head:
        return head
    prefix, ranges = head[:head.index("[")], head[head.index("[") + 1:head.index("]")]
    return prefix + ranges.split(",")[0].split("-")[0]


def shared_store_restart_hazard(environ=os.environ) -> str | None:
    """Why torchrun's restarts may fail here (or None). With ``--max-restarts`` and its default rendezvous, the
    workers' process group lives in the rendezvous' TCPStore, which torch (2.5 to 2.13 at least) keeps across
    restarts without a per-attempt prefix: a restarted worker can read its predecessor's address and fail to connect
    ("Connection refused") or wait forever (pytorch/pytorch#135712). Measured here (2 CPU ranks killed mid-save, the
    machine loaded): 2 of 2 restarts failed so, 5 of 5 passed with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, under
    which every attempt's rank 0 hosts a new store. launch/torchrun.sh and launch/slurm.sbatch set it."""
    restarts = int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if restarts > 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return (f"torchrun --max-restarts {restarts} with the rendezvous' shared TCPStore: a restarted worker group "
                "can connect to its predecessors' addresses and fail or hang (pytorch/pytorch#135712); set "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch/torchrun.sh and launch/slurm.sbatch do)")
    return None


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the job's process group when launched with several ranks; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    # srun --gpus-per-task=1 shows each task only its own GPU: local rank 3 is then device 0.
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # device_id binds NCCL's communicator to this rank's GPU at once (no guessing from the current device).
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return DistInfo(rank, world, local_rank, device)


def finish() -> None:
    """A barrier at the successful end of a run (not on errors: a failed rank would never arrive)."""
    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
