"""The DeepSeek-V3 causal LM: embedding -> blocks -> norm -> head, plus MTP modules.

Pipeline slicing (the seam for pipeline parallelism): ``embed``, ``layers`` (a ModuleDict keyed by the global layer
index, so parameter names survive when a stage keeps only a contiguous range), ``norm``, ``head`` and ``mtp`` are
top-level attributes, and a block's forward takes and returns tensors only.
TODO(pipeline issue): a stage forward that skips the parts a stage does not own.

Shapes: B batch, T tokens, D model dim, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.model.config import ModelConfig
from moetrain.model.layers import MLP, RMSNorm, recomputed
from moetrain.model.mla import MLA, document_causal_mask
from moetrain.model.moe import MoE
from moetrain.model.rope import precompute_freqs_cis

IGNORE_INDEX = -100  # label value excluded from the loss


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + ffn(norm(.)); ffn is dense for the first layers."""

    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        is_dense = layer_id < cfg.moe.first_k_dense_replace
        self.ffn = MLP(cfg.dim, cfg.inter_dim) if is_dense else MoE(layer_id, cfg)
        self.recompute = False  # full recomputation (set from outside): keep only the block's input

    def forward(self, x_BTD: torch.Tensor, freqs_cis: torch.Tensor, attn_mask: torch.Tensor | None = None):
        if self.recompute and torch.is_grad_enabled():
            return recomputed(self._forward, x_BTD, freqs_cis, attn_mask)
        return self._forward(x_BTD, freqs_cis, attn_mask)

    def _forward(self, x_BTD, freqs_cis, attn_mask):
        h = x_BTD + self.attn(self.attn_norm(x_BTD), freqs_cis, attn_mask)
        return h + self.ffn(self.ffn_norm(h))


class MTPModule(nn.Module):
    """Multi-token prediction module k: ``h_k = norm(Block(eh_proj([enorm(Emb(t_{i+k})); hnorm(h_{k-1})])))``.

    h_0 is the main model's hidden state after its final norm, and h_k (after this module's own ``norm``) feeds
    both the shared head and module k + 1, as in Megatron-LM and the engines that load DeepSeek's MTP weights.
    NOTE: the embedding comes first in the concatenation, as in DeepSeek's released weights (``eh_proj``);
    embedding and output head are shared with the main model.
    """

    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(layer_id, cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, h_prev_BTD, emb_BTD, freqs_cis, attn_mask=None) -> torch.Tensor:
        """h_prev_BTD is h_{k-1} (normed); returns h_k, the input of the shared head and of module k + 1."""
        x = self.eh_proj(torch.cat([self.enorm(emb_BTD), self.hnorm(h_prev_BTD)], dim=-1))
        return self.norm(self.block(x, freqs_cis, attn_mask))


@dataclass
class LMOutput:
    """Loss parts of one micro-batch, as sums over target tokens so that the trainer normalises globally."""

    logits: torch.Tensor  # [B, T, V] of the main head
    lm_loss_sum: torch.Tensor
    mtp_loss_sums: list[torch.Tensor] = field(default_factory=list)  # one per MTP depth k = 1..D
    n_tokens: torch.Tensor | None = None  # target tokens of the main head

    def loss(self, n_global_tokens: int | torch.Tensor, mtp_lambda: float) -> torch.Tensor:
        """``(L_main + lambda / D * sum_k L_k)``, every part normalised by the global target-token count."""
        total = self.lm_loss_sum
        if self.mtp_loss_sums:
            total = total + mtp_lambda / len(self.mtp_loss_sums) * torch.stack(self.mtp_loss_sums).sum()
        return total / n_global_tokens


# A pytree node, so that wrappers (FSDP2, torch.compile) see the tensors inside the output.
torch.utils._pytree.register_dataclass(LMOutput)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(i, cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleDict({str(k): MTPModule(cfg.n_layers + k, cfg) for k in range(cfg.n_mtp_layers)})
        self.register_buffer("freqs_cis", precompute_freqs_cis(cfg), persistent=False)

    def forward(self, tokens_BT: torch.Tensor, labels_BT: torch.Tensor | None = None,
                doc_ids_BT: torch.Tensor | None = None, position_ids_BT: torch.Tensor | None = None):
        """Without labels: logits [B, T, V]. With labels: an :class:`LMOutput` (main and MTP loss sums).

        doc_ids_BT restricts attention to each packed document; position_ids_BT restarts RoPE per document.
        """
        T = tokens_BT.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        freqs_cis = self.freqs_cis[:T] if position_ids_BT is None else self.freqs_cis[position_ids_BT]
        attn_mask = None if doc_ids_BT is None else document_causal_mask(doc_ids_BT)
        h = self.embed(tokens_BT)
        for block in self.layers.values():
            h = block(h, freqs_cis, attn_mask)
        h = self.norm(h)  # h_0 of the MTP modules is the normed state too
        logits = self.head(h)
        if labels_BT is None:
            return logits
        out = LMOutput(logits, _ce_sum(logits, labels_BT), n_tokens=(labels_BT != IGNORE_INDEX).sum())
        for k, mtp in enumerate(self.mtp.values(), start=1):
            # Position i sees Emb(t_{i+k}) and predicts t_{i+k+1}; the last k positions have no target.
            h = mtp(h, self.embed(tokens_BT.roll(-k, dims=1)), freqs_cis, attn_mask)
            labels_k = labels_BT.roll(-k, dims=1)
            labels_k[:, -k:] = IGNORE_INDEX
            out.mtp_loss_sums.append(_ce_sum(self.head(h), labels_k))
        return out


def _ce_sum(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BTV.flatten(0, 1).float(), labels_BT.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
