"""Multi-head Latent Attention (DeepSeek-V2/V3).

Queries: ``wq`` (no compression) or ``wq_b(q_norm(wq_a x))``; keys/values come from one shared latent
``c_kv = kv_norm(wkv_a x)[:kv_lora_rank]`` expanded per head by ``wkv_b``; the decoupled rotary key ``k_pe`` is
the last ``qk_rope_head_dim`` outputs of ``wkv_a`` and is shared by all heads. The attention core itself (SDPA or
FlexAttention, per ``model.attn.backend``) is :mod:`moetrain.model.attention`'s.

Shapes: B batch, T tokens, D model dim, H heads, C kv_lora_rank, R qk_rope_head_dim, N qk_nope_head_dim,
V v_head_dim.
"""

from __future__ import annotations

import torch
from torch import nn

from moetrain.model.attention import AttnMask, attend
from moetrain.model.config import ModelConfig
from moetrain.model.layers import RMSNorm, recomputed
from moetrain.model.rope import apply_rope, softmax_scale


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        a = cfg.attn
        self.n_heads, self.q_lora_rank, self.kv_lora_rank = a.n_heads, a.q_lora_rank, a.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        self.qk_head_dim = a.qk_head_dim
        if self.q_lora_rank == 0:
            self.wq = nn.Linear(cfg.dim, self.n_heads * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(cfg.dim, self.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(self.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, self.n_heads * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.wo = nn.Linear(self.n_heads * self.v_head_dim, cfg.dim, bias=False)
        self.softmax_scale = softmax_scale(cfg)
        # Selective recomputation (set from outside): keep only the latents, redo up-projections and attention.
        self.recompute_up_proj = False
        self.checkpoint_fn = None  # set with it: recomputed()'s checkpoint_fn

    def forward(self, x_BTD: torch.Tensor, freqs_cis: torch.Tensor, attn_mask: AttnMask = None) -> torch.Tensor:
        """attn_mask (from :func:`moetrain.model.attention.attention_mask`): None for causal SDPA, a bool
        [B, 1, T, T] (True = attend) for SDPA per document, or a FlexAttention BlockMask."""
        # Down-projections to the latents; everything after them is cheap to recompute from the latents.
        q_in = x_BTD if self.q_lora_rank == 0 else self.q_norm(self.wq_a(x_BTD))
        kv_c, k_pe = self.wkv_a(x_BTD).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        if self.recompute_up_proj and torch.is_grad_enabled():
            o = recomputed(self._attend, q_in, kv_c, k_pe, freqs_cis, attn_mask, checkpoint_fn=self.checkpoint_fn)
        else:
            o = self._attend(q_in, kv_c, k_pe, freqs_cis, attn_mask)
        return self.wo(o)

    def _attend(self, q_in, kv_c, k_pe, freqs_cis, attn_mask) -> torch.Tensor:
        """Up-projections, RoPE and the attention core; returns [B, T, H * V]."""
        B, T, _ = kv_c.shape
        q = self.wq(q_in) if self.q_lora_rank == 0 else self.wq_b(q_in)
        q_nope, q_pe = q.view(B, T, self.n_heads, self.qk_head_dim).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, freqs_cis)
        k_pe_BT1R = apply_rope(k_pe.unsqueeze(2), freqs_cis)
        kv = self.wkv_b(self.kv_norm(kv_c)).view(B, T, self.n_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v_BTHV = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)

        q_BHTK = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        k_BHTK = torch.cat([k_nope, k_pe_BT1R.expand(-1, -1, self.n_heads, -1)], dim=-1).transpose(1, 2)
        o_BHTV = attend(q_BHTK, k_BHTK, v_BTHV.transpose(1, 2), attn_mask, self.softmax_scale)
        return o_BHTV.transpose(1, 2).reshape(B, T, self.n_heads * self.v_head_dim)

