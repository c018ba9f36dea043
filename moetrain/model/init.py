"""Building on the meta device and per-parameter initialisation, free of any layout.

Every slice ``p[r]`` along dim 0 of every parameter draws from its own generator seeded by (seed, fully-qualified
name, r). The initial model therefore does not depend on how it is sharded, staged or wrapped, and a rank that
holds some rows of a parameter draws only those: a 671B model is initialised without any rank materialising a full
tensor. Distributed layouts write their rows through the ``write_param`` hook of :func:`init_weights`
(:func:`moetrain.parallel.init.init_weights`); this module knows only plain tensors.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence

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


def draw_rows(fqn: str, shape: torch.Size, rows: Sequence[int], std: float, seed: int) -> torch.Tensor:
    """Rows ``rows`` (along dim 0, in that order) of the N(0, std^2) initial value of parameter ``fqn`` of ``shape``."""
    base = (seed * _MIX + zlib.crc32(fqn.encode())) % 2**63
    out = torch.empty(len(rows), *shape[1:])
    gen = torch.Generator()
    for i, r in enumerate(rows):
        gen.manual_seed((base * _MIX + r) % 2**63)
        out[i].normal_(0.0, std, generator=gen)
    return out


def _ones_rows(shape: torch.Size, rows: Sequence[int]) -> torch.Tensor:
    return torch.ones(len(rows), *shape[1:])


# write_param(p, rows_of): store p's initial value into p, where rows_of(rows) returns those dim-0 rows of it.
ParamWriter = Callable[[torch.Tensor, Callable[[Sequence[int]], torch.Tensor]], None]


def write_full(p: torch.Tensor, rows_of: Callable[[Sequence[int]], torch.Tensor]) -> None:
    """The writer for plain tensors, which hold every row."""
    if type(p.data) is not torch.Tensor:
        raise TypeError(f"a {type(p.data).__name__} parameter needs a layout-aware writer: use "
                        "moetrain.parallel.init.init_weights")
    p.copy_(rows_of(range(p.shape[0])))


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0, write_param: ParamWriter = write_full) -> nn.Module:
    """Norms to 1, every other parameter ~ N(0, init_std^2); expert biases and counts to 0; RoPE recomputed."""
    std = _model_cfg(model).init_std
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            fqn = canonical_name(f"{mod_name}.{p_name}" if mod_name else p_name)
            if isinstance(module, RMSNorm):
                rows_of = functools.partial(_ones_rows, p.shape)
            else:
                rows_of = functools.partial(draw_rows, fqn, p.shape, std=std, seed=seed)
            write_param(p, rows_of)
    for module in model.modules():
        if hasattr(module, "expert_bias"):
            module.expert_bias.zero_()
            module.tokens_per_expert.zero_()
        if hasattr(module, "balance_loss_sum"):
            module.balance_loss_sum = None
        if isinstance(module, Transformer):
            module.freqs_cis = precompute_freqs_cis(module.cfg).to(module.freqs_cis.device)
    return model


def _model_cfg(model: nn.Module) -> ModelConfig:
    for module in model.modules():
        if isinstance(module, Transformer):
            return module.cfg
    raise TypeError("init_weights expects a module containing a moetrain Transformer")
