import getpass
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

os.environ.setdefault("WANDB_MODE", "disabled")
# Inherited by the subprocesses of the launch and fault tests: 2-4 ranks must not oversubscribe 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# NOTE: inductor's cache (its precompiled headers included) is not keyed by ATEN_CPU_CAPABILITY: after a run on
# AVX kernels, a run under ATEN_CPU_CAPABILITY=default compiled vectorised kernels against a scalar header and failed
# ("'at::vec' has not been declared"). One cache per capability; a fresh one builds in about a minute.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{torch.backends.cpu.get_cpu_capability().lower()}"))

from moetrain.model import MLAConfig, ModelConfig, MoEConfig, RouterConfig, build_model, init_weights  # noqa: E402


# Overrides for a seconds-long tiny run on the demo data (trainer, checkpoint and bad-input tests).
SMALL_RUN = ["logging.console=false", "train.val_interval=0", "data.demo_bytes=200000", "train.seq_len=64",
             "train.global_batch_size=8", "train.micro_batch_size=4", "logging.interval=1"]


def small_job(run_dir, *overrides):
    """The composed, validated config of a small run in ``run_dir``, as ``moetrain train`` would build it."""
    from moetrain.config import compose, to_job_config

    return to_job_config(compose([f"run.dir={run_dir}", *SMALL_RUN, *overrides]))


def small_config(**router) -> ModelConfig:
    """A 2-layer model small enough for float64 checks: 8 experts in 4 groups, MTP depth 1."""
    r = dict(topk=2, n_group=4, topk_group=2)
    r.update(router)
    return ModelConfig(
        vocab_size=64, dim=32, inter_dim=48, n_layers=2, n_mtp_layers=1, max_seq_len=64, init_std=0.05,
        attn=MLAConfig(n_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                       v_head_dim=8),
        moe=MoEConfig(n_routed_experts=8, n_shared_experts=1, moe_inter_dim=16, first_k_dense_replace=1,
                      router=RouterConfig(**r)),
    )


def make_model(cfg: ModelConfig, seed: int = 0, dtype=torch.float32):
    model = build_model(cfg, "meta").to_empty(device="cpu")
    init_weights(model, seed)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


@pytest.fixture
def torch_seed():
    torch.manual_seed(0)


def _gloo_entry(rank: int, nprocs: int, init_file: str, out_file: str, fn, args) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=nprocs)
    try:
        result = fn(rank, *args)
        if rank == 0:
            torch.save(result, out_file)
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    except BaseException:
        dist.destroy_process_group()
        raise
    # NOTE: past the barrier the work is done and saved; leave without destructors. Tearing gloo down at
    # interpreter exit sometimes aborts a rank ("terminate called without an active exception", SIGABRT).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def metrics_records(run_dir) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` (a missing file is an error)."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def run_on_gloo_ranks(fn, nprocs: int, tmp_path, *args):
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes of one real gloo group; returns rank 0's result
    (tensors, numbers, strings and containers of them). ``fn`` must be a module-level function."""
    out_file = tmp_path / "rank0_result.pt"
    mp.spawn(_gloo_entry, args=(nprocs, str(tmp_path / "gloo_init"), str(out_file), fn, args), nprocs=nprocs,
             join=True)
    return torch.load(out_file)


@pytest.fixture(scope="session")
def fp32_reference(tmp_path_factory):
    """The 3-step fp32 run of tests/layouts.py in one process (other kernels and threads than the layouts'):
    (run dir, records), shared by the expert-, data-parallel and DeepSpeed layout tests."""
    from layouts import reference_env, train_reference

    ref = tmp_path_factory.mktemp("fp32_one")
    records = train_reference(ref)
    cap = reference_env()["ATEN_CPU_CAPABILITY"].upper()
    assert f"({cap} kernels, 2 thread(s))" in (ref / "train.log").read_text()
    return ref, records


# Modules whose tests launch processes, longest first (measured on 2 cores, 2026-12-07). Run first, each module kept
# whole (its module fixtures are set up once): with one pytest worker per core (-n auto) the suite then ends on
# short tests rather than one worker alone on a long launch while the other core idles.
LONG_MODULES = ("test_deepspeed", "test_pipeline", "test_expert_parallel", "test_readme", "test_train", "test_launch",
                "test_precision", "test_checkpoint", "test_loss_trace")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rpartition(".")[2], len(rank)))  # stable
