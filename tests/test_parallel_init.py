"""Layout-aware initialisation: DTensor parameters on 2 gloo ranks get exactly the single-process values."""

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from conftest import make_model, run_on_gloo_ranks, small_config
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


def _worker(rank: int) -> dict:
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
    return {n: p.full_tensor() for n, p in model.named_parameters()}


def test_dtensor_layouts_get_single_process_values(tmp_path):
    got = run_on_gloo_ranks(_worker, 2, tmp_path)
    ref = dict(make_model(_config(), seed=3).named_parameters())
    assert got.keys() == ref.keys()
    for name, p in ref.items():
        assert torch.equal(got[name], p.detach()), name
