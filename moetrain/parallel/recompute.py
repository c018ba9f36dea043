"""Activation recomputation plans, applied from outside the model.

- ``selective`` (the V3 report): recompute every RMSNorm and MLA's up-projections (with RoPE and the attention
  core that consume them) in backward, keeping only the compressed latents.
- ``full``: keep only each block's input and recompute the whole block.
"""

from __future__ import annotations

from torch import nn

from moetrain.model.layers import RMSNorm
from moetrain.model.mla import MLA
from moetrain.model.transformer import Block


def apply_recompute(model: nn.Module, mode: str, checkpoint_fn=None) -> None:
    """``checkpoint_fn``: the precision's checkpoint function (:meth:`moetrain.precision.Precision.checkpoint_fn`),
    None for torch's."""
    if mode not in ("none", "selective", "full"):
        raise ValueError(f"train.recompute: must be none, selective or full, got {mode!r}")
    for m in model.modules():
        if isinstance(m, (Block, RMSNorm, MLA)):
            m.checkpoint_fn = checkpoint_fn
        if isinstance(m, Block):
            m.recompute = mode == "full"
        elif isinstance(m, RMSNorm):
            m.recompute = mode == "selective"
        elif isinstance(m, MLA):
            m.recompute_up_proj = mode == "selective"
