"""Building on the meta device and per-parameter initialisation.

Every slice ``p[r]`` along dim 0 of every parameter draws from its own generator seeded by (seed, fully-qualified
name, r). The initial model therefore does not depend on how it is sharded, staged or wrapped, and a rank that
holds rows [a, b) of a parameter (FSDP2 shards dim 0) draws only those rows: a 671B model is initialised without
any rank materialising a full tensor.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from moetrain.model.config import ModelConfig
from moetrain.model.layers import RMSNorm
from moetrain.model.rope import precompute_freqs_cis
from moetrain.model.transformer import Transformer

# Wrappers (torch.compile, activation checkpointing, FSDP) insert these into names; strip them for stable seeds.
_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
_MIX = 1_000_003  # odd multiplier that spreads (seed, name, row) over the 63-bit seed space


def build_model(cfg: ModelConfig, device: str | torch.device = "meta") -> Transformer:
    """Construct without allocating (meta) or directly on a device; weights are uninitialised."""
    cfg.validate()
    with torch.device(device):
        return Transformer(cfg)


def canonical_name(fqn: str) -> str:
    for part in _WRAPPER_PARTS:
        fqn = fqn.replace(part, "")
    return fqn


def draw_rows(fqn: str, shape: torch.Size, rows: range, std: float, seed: int) -> torch.Tensor:
    """Rows ``rows`` (along dim 0) of the N(0, std^2) initial value of parameter ``fqn`` of ``shape``."""
    base = (seed * _MIX + zlib.crc32(fqn.encode())) % 2**63
    out = torch.empty(len(rows), *shape[1:])
    gen = torch.Generator()
    for i, r in enumerate(rows):
        gen.manual_seed((base * _MIX + r) % 2**63)
        out[i].normal_(0.0, std, generator=gen)
    return out


def _local_rows(p: torch.Tensor) -> range | None:
    """The dim-0 rows this rank holds of a DTensor sharded on dim 0 only (FSDP2), else None."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not all(isinstance(pl, Shard) and pl.dim == 0 for pl in p.placements):
        return None
    local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return range(offset[0], offset[0] + local_shape[0]) if local_shape else range(0)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Norms to 1, every other parameter ~ N(0, init_std^2); expert biases and counts to 0; RoPE recomputed."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    std = _model_cfg(model).init_std
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if isinstance(module, RMSNorm):
                p.fill_(1.0)
                continue
            fqn = canonical_name(f"{mod_name}.{p_name}" if mod_name else p_name)
            if not isinstance(p, DTensor):
                p.copy_(draw_rows(fqn, p.shape, range(p.shape[0]), std, seed))
            elif (rows := _local_rows(p)) is not None:
                p.to_local().copy_(draw_rows(fqn, p.shape, rows, std, seed))
            else:  # other layouts: draw in full, keep this rank's part
                full = draw_rows(fqn, p.shape, range(p.shape[0]), std, seed).to(p.device)
                p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements).to_local())
    for module in model.modules():
        if hasattr(module, "expert_bias"):
            module.expert_bias.zero_()
            module.tokens_per_expert.zero_()
        if isinstance(module, Transformer):
            module.freqs_cis = precompute_freqs_cis(module.cfg).to(module.freqs_cis.device)
    return model


def _model_cfg(model: nn.Module) -> ModelConfig:
    for module in model.modules():
        if isinstance(module, Transformer):
            return module.cfg
    raise TypeError("init_weights expects a module containing a moetrain Transformer")
