"""Rotary position embedding of MLA's decoupled part, with YaRN context extension.

DeepSeek lays rotary dims out as interleaved pairs (x0, x1), (x2, x3), ... each rotated by one frequency; we keep
that layout and rotate each pair by (cos, sin), in real arithmetic so that torch.compile can fuse it. Hugging
Face's ``rope_interleave=True`` path is the same rotation written with its outputs de-interleaved, which leaves
every q.k dot product unchanged.
"""

from __future__ import annotations

import math

import torch

from moetrain.model.config import ModelConfig, RopeConfig


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(cfg: RopeConfig, rope_dim: int) -> torch.Tensor:
    """Blend interpolated (divided by factor) and original frequencies with YaRN's linear ramp over dims."""
    base = cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (cfg.factor * pos_freqs)

    def correction_dim(n_rotations: float) -> float:
        return rope_dim * math.log(cfg.original_max_position_embeddings / (n_rotations * 2 * math.pi)) / (
            2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_original = 1 - ramp  # 1 for high-frequency dims (extrapolate), 0 for low-frequency dims (interpolate)
    return interpolation * (1 - keep_original) + extrapolation * keep_original


def rope_attention_factor(cfg: RopeConfig) -> float:
    """Magnitude YaRN gives cos/sin: mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1 for V3)."""
    if cfg.scaling != "yarn":
        return 1.0
    if cfg.mscale and cfg.mscale_all_dim:
        return yarn_get_mscale(cfg.factor, cfg.mscale) / yarn_get_mscale(cfg.factor, cfg.mscale_all_dim)
    return yarn_get_mscale(cfg.factor)


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under YaRN (the softmax-scale correction)."""
    scale = cfg.attn.qk_head_dim ** -0.5
    if cfg.rope.scaling == "yarn" and cfg.rope.mscale_all_dim:
        scale *= yarn_get_mscale(cfg.rope.factor, cfg.rope.mscale_all_dim) ** 2
    return scale


def precompute_freqs_cis(cfg: ModelConfig) -> torch.Tensor:
    """Rotations [max_seq_len, qk_rope_head_dim // 2, 2] as (cos, sin), scaled by YaRN's attention factor."""
    rope_dim = cfg.attn.qk_rope_head_dim
    if cfg.rope.scaling == "yarn":
        inv_freq = _yarn_inv_freq(cfg.rope, rope_dim)
    else:
        inv_freq = 1.0 / (cfg.rope.rope_theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1) * rope_attention_factor(cfg.rope)


def apply_rope(x_BTHR: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim. freqs_cis: [T, R/2, 2] or [B, T, R/2, 2] (per-document positions)."""
    freqs = freqs_cis[None, :, None] if freqs_cis.dim() == 3 else freqs_cis[:, :, None]
    cos, sin = freqs.unbind(-1)
    x = x_BTHR.float().unflatten(-1, (-1, 2))
    x_even, x_odd = x.unbind(-1)
    rotated = torch.stack([x_even * cos - x_odd * sin, x_odd * cos + x_even * sin], dim=-1)
    return rotated.flatten(-2).to(x_BTHR.dtype)
