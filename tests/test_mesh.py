"""The job mesh: layouts that can never work are refused at config time with their arithmetic; on 4 real gloo
ranks the groups hold the ranks DeepSpeed's expert groups hold, and each reduction sums exactly its members."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from moetrain.config import ParallelConfig, compose, to_job_config
from moetrain.model import ConfigError
from moetrain.parallel.mesh import all_reduce_sum, build_mesh

BATCH = ["train.global_batch_size=64", "train.micro_batch_size=1"]  # divisible by every dp below


# ------------------------------------------------------------------------------------- refusals at config time
@pytest.mark.parametrize("world,overrides,key,message", [
    (8, ["parallel.pp=2", "parallel.ep=3"], "parallel.ep",
     "parallel.ep: ep=3 does not divide the data-parallel size dp=4 (= world size 8 / pp 2)"),
    (8, ["parallel.ep=8", "model.moe.n_routed_experts=12", "model.moe.router.n_group=1",
         "model.moe.router.topk_group=1"], "model.moe.n_routed_experts",
     "model.moe.n_routed_experts: 12 experts cannot be split over ep=8 ranks (12 % 8 = 4)"),
    (4, ["parallel.dp=3"], "parallel.dp",
     "parallel.dp: dp * pp = 3 * 1 = 3 must equal the world size 4 (or set parallel.dp=-1)"),
    (8, ["parallel.pp=3"], "parallel.pp", "parallel.pp: the world size 8 is not divisible by pp=3 (8 % 3 = 2)"),
    (4, ["parallel.dp_strategy=zero"], "parallel.dp_strategy",
     "parallel.dp_strategy: must be one of fsdp, deepspeed, ddp, got 'zero'"),
    (4, ["parallel.pp=2", "parallel.dp_strategy=deepspeed"], "parallel.dp_strategy",
     "parallel.dp_strategy: deepspeed cannot run with pp=2"),
    (4, ["parallel.zero_stage=3"], "parallel.zero_stage", "parallel.zero_stage: must be 1 or 2, got 3"),
    (4, ["parallel.offload_optimizer=true"], "parallel.offload_optimizer",
     "parallel.offload_optimizer: only dp_strategy=deepspeed offloads the optimizer, got dp_strategy=fsdp"),
])
def test_impossible_layout_is_named_with_its_arithmetic(monkeypatch, world, overrides, key, message):
    """Checked before the trainer's own refusals and before any process group."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError) as e:
        to_job_config(compose([*BATCH, *overrides]))
    assert e.value.key == key and str(e.value).startswith(message), str(e.value)


def test_full_mesh_layout_is_accepted(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    job = to_job_config(compose([*BATCH, "parallel.pp=2", "parallel.ep=2"]))
    assert (job.parallel.pp, job.parallel.data_parallel_size(4), job.parallel.ep) == (2, 2, 2)


def test_deepspeed_zero2_with_offload_is_accepted(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    job = to_job_config(compose([*BATCH, "parallel.dp_strategy=deepspeed", "parallel.zero_stage=2",
                                 "parallel.offload_optimizer=true", "parallel.ep=2"]))
    assert (job.parallel.dp_strategy, job.parallel.zero_stage, job.parallel.offload_optimizer) == ("deepspeed", 2, True)


def test_one_process_needs_no_process_group():
    mesh = build_mesh(ParallelConfig(), 1, "cpu")
    assert (mesh.pp, mesh.dp, mesh.edp, mesh.ep) == (1, 1, 1, 1)
    assert (mesh.pp_rank, mesh.dp_rank, mesh.edp_rank, mesh.ep_rank) == (0, 0, 0, 0)
    assert mesh.device_mesh is mesh.dp_mesh is mesh.dp_group is mesh.ep_group is mesh.edp_group is None
    t = torch.tensor([3.0])
    assert all_reduce_sum(t, mesh.dp_group) is t and t.item() == 3.0


# ------------------------------------------------------------------------------------------- 4 gloo ranks
def _groups_and_sums(mesh) -> dict:
    """Per group: its member ranks, and the all-reduced sum of 2**rank over it (identifies the members)."""
    import torch.distributed as dist

    out = {"sizes": [mesh.pp, mesh.dp, mesh.edp, mesh.ep],
           "ranks": [mesh.pp_rank, mesh.dp_rank, mesh.edp_rank, mesh.ep_rank], "shape": list(mesh.device_mesh.shape)}
    for name in ("pp", "dp", "edp", "ep"):
        group = getattr(mesh, f"{name}_group")
        out[f"{name}_members"] = dist.get_process_group_ranks(group)
        out[f"{name}_sum"] = all_reduce_sum(torch.tensor([2.0 ** dist.get_rank()]), group).item()
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    from moetrain.parallel.dist import destroy, init_distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="4", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    init_distributed("cpu")  # the process group the trainer starts; build_mesh reuses it
    try:
        found = {"dp4_ep2": _groups_and_sums(build_mesh(ParallelConfig(ep=2), 4, "cpu")),
                 "pp2_dp2": _groups_and_sums(build_mesh(ParallelConfig(pp=2), 4, "cpu"))}
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(found, f)
        torch.distributed.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expected(groups: list[list[int]], rank: int) -> tuple[list[int], float]:
    (members,) = [g for g in groups if rank in g]
    return members, float(sum(2 ** r for r in members))


def test_mesh_groups_and_reductions_on_four_ranks(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=4, join=True)
    found = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(4)]
    # (pp, dp, edp, ep) sizes, groups and this rank's coordinates, worked out by hand from rank = pp*dp + edp*ep + ep
    layouts = {
        "dp4_ep2": ([1, 4, 2, 2], [1, 2, 2],
                    {"pp": [[0], [1], [2], [3]], "dp": [[0, 1, 2, 3]], "edp": [[0, 2], [1, 3]], "ep": [[0, 1], [2, 3]]},
                    lambda r: [0, r, r // 2, r % 2]),
        "pp2_dp2": ([2, 2, 2, 1], [2, 2, 1],
                    {"pp": [[0, 2], [1, 3]], "dp": [[0, 1], [2, 3]], "edp": [[0, 1], [2, 3]],
                     "ep": [[0], [1], [2], [3]]},
                    lambda r: [r // 2, r % 2, r % 2, 0]),
    }
    for name, (sizes, shape, groups, coords) in layouts.items():
        for rank, got in enumerate(f[name] for f in found):
            assert got["sizes"] == sizes and got["shape"] == shape, (name, rank, got)
            assert got["ranks"] == coords(rank), (name, rank, got["ranks"])
            for dim, dim_groups in groups.items():
                members, total = _expected(dim_groups, rank)
                assert got[f"{dim}_members"] == members, (name, rank, dim, got[f"{dim}_members"])
                assert got[f"{dim}_sum"] == total, (name, rank, dim, got[f"{dim}_sum"])
