"""Building on the meta device and per-parameter initialisation.

Every parameter draws from its own generator seeded by (seed, fully-qualified name), so the initial model does
not depend on how it is sharded, staged or wrapped: a layout change never changes the starting point.
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


def build_model(cfg: ModelConfig, device: str | torch.device = "meta") -> Transformer:
    """Construct without allocating (meta) or directly on a device; weights are uninitialised."""
    cfg.validate()
    with torch.device(device):
        return Transformer(cfg)


def canonical_name(fqn: str) -> str:
    for part in _WRAPPER_PARTS:
        fqn = fqn.replace(part, "")
    return fqn


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Norms to 1, every other parameter ~ N(0, init_std^2); expert biases and counts to 0; RoPE recomputed."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    std = _model_cfg(model).init_std
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            fqn = canonical_name(f"{mod_name}.{p_name}" if mod_name else p_name)
            if isinstance(module, RMSNorm):
                full = torch.ones(p.shape)
            else:
                gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(fqn.encode())) % 2**63)
                full = torch.empty(p.shape).normal_(0.0, std, generator=gen)
            if isinstance(p, DTensor):
                p.to_local().copy_(distribute_tensor(full.to(p.device), p.device_mesh, p.placements).to_local())
            else:
                p.copy_(full)
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
