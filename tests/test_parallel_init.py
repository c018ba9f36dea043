"""Layout-aware initialisation: DTensor parameters on 2 gloo ranks get exactly the single-process values."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from conftest import make_model, small_config
from moetrain.model import build_model
from moetrain.parallel.init import init_weights

# Parameter -> placement on a 1-D mesh of 2 ranks; the rest are Shard(0), as FSDP2 makes them.
_PLACEMENTS = {
    "embed.weight": Shard(0),  # 65 rows: uneven shards
    "layers.1.attn.wkv_a.weight": Shard(1),  # another dim: drawn in full, split locally
    "layers.1.ffn.experts.w1": _StridedShard(0, split_factor=2),  # interleaved rows (FSDP2 over expert shards)
    "head.weight": Replicate(),
}


def _config():
    cfg = small_config()
    cfg.vocab_size = 65
    return cfg


def _worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        model = build_model(_config(), "meta")
        for name, p in list(model.named_parameters()):
            mod_name, _, p_name = name.rpartition(".")
            placement = _PLACEMENTS.get(name, Shard(0))
            full = torch.empty(p.shape)
            local = distribute_tensor(full, mesh, [placement], src_data_rank=None)
            model.get_submodule(mod_name).register_parameter(p_name, torch.nn.Parameter(local))
        model.to_empty(device="cpu")
        init_weights(model, seed=3)
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save(full, out_file)
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_dtensor_layouts_get_single_process_values(tmp_path):
    out_file = tmp_path / "full.pt"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    got = torch.load(out_file)
    ref = dict(make_model(_config(), seed=3).named_parameters())
    assert got.keys() == ref.keys()
    for name, p in ref.items():
        assert torch.equal(got[name], p.detach()), name
