"""FSDP2 mixed precision as the GPU path applies it (checked on 2 gloo ranks): blocks and experts compute with
bf16 parameters, routers with fp32 ones, and the parameters the optimizer updates stay fp32."""

import torch

from conftest import run_on_gloo_ranks, small_config
from moetrain.config import ParallelConfig
from moetrain.model import build_model
from moetrain.model.moe import MoE
from moetrain.parallel.data_parallel import apply_fsdp
from moetrain.parallel.init import init_weights
from moetrain.parallel.mesh import build_mesh


def _worker(rank: int) -> dict:
    mesh = build_mesh(ParallelConfig(dp=2), 2, "cpu")
    model = build_model(small_config(), "meta")
    apply_fsdp(model, mesh, torch.bfloat16)
    model.to_empty(device="cpu")
    init_weights(model, seed=0)
    seen = {}

    def record(key, weight_of):  # the dtype a module's parameters have when its forward runs
        def hook(module, args):
            seen.setdefault(key, str(weight_of(module).dtype))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, MoE):
            module.gate.register_forward_pre_hook(record(f"{name}.gate", lambda m: m.weight))
            module.experts.register_forward_pre_hook(record(f"{name}.experts", lambda m: m.w1))
    model.layers["0"].register_forward_pre_hook(record("dense", lambda m: m.attn_norm.weight))
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(rank))
    out = model(tokens, tokens.roll(-1, 1))
    out.loss(out.n_tokens, 0.3).backward()
    masters = {p.dtype for p in model.parameters()} | {p.grad.dtype for p in model.parameters() if p.grad is not None}
    return {"seen": seen, "masters": sorted(map(str, masters))}


def test_bf16_compute_keeps_routers_and_master_weights_fp32(tmp_path):
    got = run_on_gloo_ranks(_worker, 2, tmp_path)
    gates = {k: v for k, v in got["seen"].items() if k.endswith(".gate")}
    experts = {k: v for k, v in got["seen"].items() if k.endswith(".experts")}
    assert gates and set(gates.values()) == {"torch.float32"}, got
    assert experts and set(experts.values()) == {"torch.bfloat16"}, got
    assert got["seen"]["dense"] == "torch.bfloat16"
    assert got["masters"] == ["torch.float32"]
