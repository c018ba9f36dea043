"""Rotary position embedding of MLA's decoupled part, with YaRN context extension.

DeepSeek lays rotary dims out as interleaved pairs (x0, x1), (x2, x3), ... each rotated by one frequency; we keep
that layout and rotate by complex multiplication. Hugging Face's ``rope_interleave=True`` path is the same rotation
written with its outputs de-interleaved, which leaves every q.k dot product unchanged.
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
    """Complex rotations [max_seq_len, qk_rope_head_dim // 2] (complex64), magnitude = YaRN attention factor."""
    rope_dim = cfg.attn.qk_rope_head_dim
    if cfg.rope.scaling == "yarn":
        inv_freq = _yarn_inv_freq(cfg.rope, rope_dim)
    else:
        inv_freq = 1.0 / (cfg.rope.rope_theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv_freq)
    magnitude = torch.full_like(angles, rope_attention_factor(cfg.rope))
    return torch.polar(magnitude, angles)


def apply_rope(x_BTHR: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim. freqs_cis: [T, R/2] or [B, T, R/2] (per-document positions)."""
    x = torch.view_as_complex(x_BTHR.float().unflatten(-1, (-1, 2)))
    if freqs_cis.dim() == 2:
        freqs = freqs_cis[None, :, None, :]
    else:
        freqs = freqs_cis[:, :, None, :]
    return torch.view_as_real(x * freqs).flatten(-2).to(x_BTHR.dtype)
