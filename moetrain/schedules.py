"""Step-indexed schedules: learning rate, bias-update speed gamma, MTP weight lambda, batch-size ramp.

Steps count from 1; fractions are of ``train.steps`` (the V3 report states its phases in tokens, which at a
fixed batch size are proportional to steps).
"""

from __future__ import annotations

import math

from moetrain.config import OptimConfig, TrainConfig


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.schedule == "cosine":
        return _cosine(step, cfg.warmup_steps, total_steps, cfg.lr, cfg.min_lr)
    # v3: constant, cosine decay, constant min_lr, then final_lr.
    decay_start, decay_end = cfg.decay_start * total_steps, cfg.decay_end * total_steps
    if cfg.final_lr is not None and step > cfg.final_start * total_steps:
        return cfg.final_lr
    if step <= decay_start:
        return cfg.lr
    if step >= decay_end:
        return cfg.min_lr
    return _cosine(step, decay_start, decay_end, cfg.lr, cfg.min_lr)


def _cosine(step: float, start: float, end: float, hi: float, lo: float) -> float:
    progress = min(max((step - start) / max(end - start, 1), 0.0), 1.0)
    return lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * progress))


def bias_update_speed_at(step: int, cfg: TrainConfig) -> float:
    """gamma: ``bias_update_speed``, then 0 from ``bias_update_stop * steps`` on (V3: the last 500B tokens)."""
    return cfg.bias_update_speed if step <= cfg.bias_update_stop * cfg.steps else 0.0


def mtp_lambda_at(step: int, cfg: TrainConfig) -> float:
    return cfg.mtp_lambda if step <= cfg.mtp_lambda_switch * cfg.steps else cfg.mtp_lambda_final


def global_batch_at(tokens_seen: int, cfg: TrainConfig, dp: int) -> int:
    """Sequences in the next step: a linear ramp from ``batch_ramp_start`` over ``batch_ramp_tokens``, in whole
    multiples of micro_batch_size * dp, then ``global_batch_size``."""
    if not cfg.batch_ramp_start or tokens_seen >= cfg.batch_ramp_tokens:
        return cfg.global_batch_size
    unit = cfg.micro_batch_size * dp
    target = cfg.batch_ramp_start + (cfg.global_batch_size - cfg.batch_ramp_start) * tokens_seen / cfg.batch_ramp_tokens
    return max(cfg.batch_ramp_start, int(target) // unit * unit)
