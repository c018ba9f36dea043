"""The DeepSeek-V3 causal LM: embedding -> blocks -> norm -> head, plus MTP modules.

Pipeline slicing (the seam for pipeline parallelism): ``embed``, ``layers`` (a ModuleDict keyed by the global layer
index, so parameter names survive when a stage keeps only a contiguous range), ``norm``, ``head`` and ``mtp`` are
top-level attributes, and a block's forward takes and returns tensors only. A pipeline stage
(:mod:`moetrain.parallel.pipeline`) is a Transformer holding some of them: without the embedding it takes hidden
states, without the head it returns them, and its last stage returns the heads' logits for :func:`lm_output`, or
with ``loss_chunk_tokens`` the loss sums it computed itself, chunk by chunk (:func:`stage_lm_output`).

Shapes: B batch, T tokens, D model dim, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moetrain._compat import register_pytree_dataclass
from moetrain.model.config import ModelConfig
from moetrain.model.layers import MLP, RMSNorm, recomputed, uninitialised
from moetrain.model.attention import attention_mask
from moetrain.model.loss import IGNORE_INDEX, chunked_ce_sum
from moetrain.model.mla import MLA
from moetrain.model.moe import MoE
from moetrain.model.rope import precompute_freqs_cis

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
        self.checkpoint_fn = None  # set with it: recomputed()'s checkpoint_fn

    def forward(self, x_BTD: torch.Tensor, freqs_cis: torch.Tensor, attn_mask: torch.Tensor | None = None):
        if self.recompute and torch.is_grad_enabled():
            return recomputed(self._forward, x_BTD, freqs_cis, attn_mask, checkpoint_fn=self.checkpoint_fn)
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

    logits: torch.Tensor | None  # [B, T, V] of the main head; None from the chunked loss, which never holds them
    lm_loss_sum: torch.Tensor
    mtp_loss_sums: list[torch.Tensor] = field(default_factory=list)  # one per MTP depth k = 1..D
    n_tokens: torch.Tensor | None = None  # target tokens of the main head

    def loss(self, n_global_tokens: int | torch.Tensor, mtp_lambda: float) -> torch.Tensor:
        """``(L_main + lambda / D * sum_k L_k)``, every part normalised by the global target-token count."""
        total = self.lm_loss_sum
        if self.mtp_loss_sums:
            total = total + mtp_lambda / len(self.mtp_loss_sums) * torch.stack(self.mtp_loss_sums).sum()
        return total / n_global_tokens

    def sums(self) -> tuple[torch.Tensor, ...]:
        """The loss sums ``(main, depth 1, ..., depth D)``, each 0-dim: what a chunked last stage returns."""
        return (self.lm_loss_sum, *self.mtp_loss_sums)


# A pytree node, so that wrappers (FSDP2, torch.compile) see the tensors inside the output.
register_pytree_dataclass(LMOutput)


def lm_output(logits: tuple[torch.Tensor, ...] | list[torch.Tensor], labels_BT: torch.Tensor) -> LMOutput:
    """The loss function: main and MTP loss sums from the head's logits ``(main, depth 1, ..., depth D)``.

    Depth k at position i predicts t_{i+k+1}: its labels are the main labels shifted by k, the last k unscored.
    """
    return _lm_output(logits, labels_BT, _ce_sum, logits[0])


def chunked_lm_output(h: list[torch.Tensor], head_w_VD: torch.Tensor, labels_BT: torch.Tensor,
                      chunk_tokens: int) -> LMOutput:
    """As :func:`lm_output`, from the head's inputs ``(main, depth 1, ..., depth D)`` (each [B, T, D], normed) and
    its weight: every depth's loss ``chunk_tokens`` tokens at a time (:mod:`moetrain.model.loss`); no logits."""

    def ce_sum(h_BTD, labels):
        return chunked_ce_sum(h_BTD.flatten(0, 1), head_w_VD, labels.flatten(), chunk_tokens)

    return _lm_output(h, labels_BT, ce_sum, None)


def stage_lm_output(outputs: tuple[torch.Tensor, ...], labels_BT: torch.Tensor, chunked: bool) -> LMOutput:
    """A pipeline's loss function, on its last stage's outputs: the heads' logits (:func:`lm_output`) or, chunked,
    the loss sums that stage computed in its forward (:meth:`LMOutput.sums`; no logits)."""
    if not chunked:
        return lm_output(outputs, labels_BT)
    return LMOutput(None, outputs[0], list(outputs[1:]), n_tokens=(labels_BT != IGNORE_INDEX).sum())


def _lm_output(xs, labels_BT: torch.Tensor, ce_sum, logits: torch.Tensor | None) -> LMOutput:
    """Depth k's loss sum from ``ce_sum(xs[k], labels of depth k)``."""
    out = LMOutput(logits, ce_sum(xs[0], labels_BT), n_tokens=(labels_BT != IGNORE_INDEX).sum())
    for k, x_k in enumerate(xs[1:], start=1):
        labels_k = labels_BT.roll(-k, dims=1)
        labels_k[:, -k:] = IGNORE_INDEX
        out.mtp_loss_sums.append(ce_sum(x_k, labels_k))
    return out


class Transformer(nn.Module):
    # Tokens per chunk of the heads' loss (train.loss_chunk_tokens, set from outside, kept by every stage); 0: the
    # heads' full logits.
    loss_chunk_tokens: int = 0

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(i, cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleDict({str(k): MTPModule(cfg.n_layers + k, cfg) for k in range(cfg.n_mtp_layers)})
        self.register_buffer("freqs_cis", precompute_freqs_cis(cfg), persistent=False)
        # What a pipeline stage owns (see stage()): the embedding of its input (else the input is a hidden state),
        # the norm, head and MTP modules (else it returns the hidden state).
        self.is_first, self.is_last, self.is_stage = True, True, False

    def stage(self, layer_ids: list[int], first: bool, last: bool, embed: nn.Embedding | None) -> "Transformer":
        """A pipeline stage sharing this model's modules: blocks ``layer_ids``, ``embed`` (the first stage's input
        embedding, or the last stage's for MTP), and on the last stage the norm, head and MTP modules."""
        stage = uninitialised(Transformer)
        stage.cfg = self.cfg
        stage.is_first, stage.is_last, stage.is_stage = first, last, True
        stage.loss_chunk_tokens = self.loss_chunk_tokens
        if embed is not None:
            stage.embed = embed
        stage.layers = nn.ModuleDict({str(i): self.layers[str(i)] for i in layer_ids})
        if last:
            stage.norm, stage.head = self.norm, self.head
        stage.mtp = self.mtp if last else nn.ModuleDict()
        stage.register_buffer("freqs_cis", self.freqs_cis, persistent=False)
        return stage

    def forward(self, x: torch.Tensor, labels_BT: torch.Tensor | None = None, doc_ids_BT: torch.Tensor | None = None,
                position_ids_BT: torch.Tensor | None = None, tokens_BT: torch.Tensor | None = None):
        """Whole model: ``x`` = tokens [B, T]; without labels the logits [B, T, V], with labels an
        :class:`LMOutput` (main and MTP loss sums; no logits when ``loss_chunk_tokens`` is set).

        Pipeline stage: ``x`` = tokens on the first stage, else the hidden state [B, T, D]; returns the hidden state,
        or on the last stage the logits of the main head and of every MTP depth (for :func:`lm_output`), whose
        embeddings need ``tokens_BT``; with ``loss_chunk_tokens`` the last stage needs ``labels_BT`` and returns
        the loss sums instead (:meth:`LMOutput.sums`), never the logits. doc_ids_BT restricts attention to each
        packed document; position_ids_BT restarts RoPE per document.
        """
        T = x.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        freqs_cis = self.freqs_cis[:T] if position_ids_BT is None else self.freqs_cis[position_ids_BT]
        # One mask per micro-batch, shared by every block and MTP module (a BlockMask under model.attn.backend=flex).
        attn_mask = attention_mask(self.cfg.attn.backend, doc_ids_BT, T, x.device)
        h = self.embed(x) if self.is_first else x
        for block in self.layers.values():
            h = block(h, freqs_cis, attn_mask)
        if not self.is_last:
            return h
        h = self.norm(h)  # h_0 of the MTP modules is the normed state too
        if labels_BT is None and not self.is_stage:
            return self.head(h)
        # Chunked: each depth's head input goes to the loss, which computes the logits a chunk at a time. A last
        # stage computes it here too, not in the schedule's loss function: inside forward a data-parallel wrapper
        # (FSDP2) has the head's weight gathered, as on the whole model.
        chunked = self.loss_chunk_tokens > 0
        if chunked and labels_BT is None:
            raise ValueError("train.loss_chunk_tokens: a pipeline's last stage computes the chunked loss in its "
                             "forward and needs labels_BT (it never returns the logits)")
        outs = [h if chunked else self.head(h)]
        tokens_BT = x if tokens_BT is None and self.is_first else tokens_BT
        for k, mtp in enumerate(self.mtp.values(), start=1):
            # Position i sees Emb(t_{i+k}) and predicts t_{i+k+1}.
            h = mtp(h, self.embed(tokens_BT.roll(-k, dims=1)), freqs_cis, attn_mask)
            outs.append(h if chunked else self.head(h))
        if chunked:
            out = chunked_lm_output(outs, self.head.weight, labels_BT, self.loss_chunk_tokens)
            return out.sums() if self.is_stage else out
        return tuple(outs) if self.is_stage else lm_output(outs, labels_BT)


def _ce_sum(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BTV.flatten(0, 1).float(), labels_BT.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
