"""The host-sync budget (moetrain.host_syncs counts reads of device values and data-dependent shapes): one process,
FSDP and DDP wait for the host once per step; expert parallelism once more per MoE layer and forward (the
all-to-all split sizes), never in backward; a log step a constant number of times, whatever the layer count."""

import os

from conftest import run_on_gloo_ranks, small_job
from moetrain.host_syncs import HostSyncCounter
from moetrain.model.balance import routers
from moetrain.train import Trainer


def _step_syncs(trainer: Trainer, steps: int = 2) -> list[dict]:
    counts = []
    for _ in range(steps):
        trainer.step += 1
        with HostSyncCounter() as syncs:
            stats = trainer.train_step()
        counts.append(dict(syncs.by_op))
    return counts, stats


def test_one_process_reads_the_host_once_per_step_and_a_constant_number_per_log_step(tmp_path):
    log_syncs = []
    for n_layers in (4, 6):
        trainer = Trainer(small_job(tmp_path / f"l{n_layers}", "train.steps=5", f"model.n_layers={n_layers}"))
        counts, stats = _step_syncs(trainer)
        assert counts == [{"tolist": 1}] * 2, counts  # the losses, the norm and the stop flag, one transfer
        with HostSyncCounter() as syncs:
            trainer.log_step(stats, 1.0)
        log_syncs.append((len(routers(trainer.model)), syncs.total))
        trainer.close()
    (layers_a, a), (layers_b, b) = log_syncs
    assert layers_b > layers_a and a == b and a <= 2, log_syncs  # one for every layer's balance table


def _in_group(rank: int, run_dir: str) -> dict:
    import torch

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    found = {}
    for name, overrides in (("fsdp", []), ("ddp", ["parallel.dp_strategy=ddp"]), ("ep2", ["parallel.ep=2"])):
        trainer = Trainer(small_job(f"{run_dir}/{name}", "train.steps=5", *overrides))
        found[name], _ = _step_syncs(trainer)
        if name == "ep2":
            found["moe_layers"] = len(routers(trainer.model))
            found["micro_batches"] = len(trainer.loader.next_step(trainer.job.train.global_batch_size))
            tokens = torch.randint(0, trainer.job.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
            with HostSyncCounter() as forward:
                out = trainer.model(tokens, tokens.roll(-1, 1))
            with HostSyncCounter() as backward:
                out.loss(out.n_tokens, 0.3).backward()
            found["forward"], found["backward"] = dict(forward.by_op), dict(backward.by_op)
        trainer.close()
    return found


def test_data_and_expert_parallel_read_the_host_within_budget(tmp_path):
    got = run_on_gloo_ranks(_in_group, 2, tmp_path, str(tmp_path / "runs"))
    assert got["fsdp"] == got["ddp"] == [{"tolist": 1}] * 2, got
    layers = got["moe_layers"]
    assert layers >= 2 and got["forward"] == {"tolist": layers} and got["backward"] == {}, got
    assert got["ep2"] == [{"tolist": 1 + layers * got["micro_batches"]}] * 2, got
