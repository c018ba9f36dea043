"""MLA's attention core, ``softmax(q k^T * scale) v`` under a causal or per-document causal mask, by one of two
backends (``model.attn.backend``):

- ``sdpa``: ``F.scaled_dot_product_attention``, causal, or with a dense bool mask [B, 1, T, T] for packed
  documents. The reference, and the CPU default.
- ``flex``: FlexAttention with a :class:`BlockMask` built from the document ids at the granularity of
  ``BLOCK`` x ``BLOCK`` tiles: tiles no same-document pair reaches are skipped, tiles wholly inside one document
  skip the mask, and no [T, T] tensor exists. The CUDA default: SDPA's flash kernel refuses MLA's head dims (192
  for q/k, 128 for v) and every fused SDPA kernel loses its block skipping under a dense mask.

The mask is built once per micro-batch (:func:`attention_mask`, in the model's forward) and shared by every layer
and MTP module; :func:`attend` picks the kernel from the mask's type.

Shapes: B batch, T tokens, H heads, K q/k head dim, V v head dim, N tiles of ``BLOCK`` tokens.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from moetrain._compat import flex_attention_eager

BLOCK = 128  # FlexAttention's default tile (queries and keys), which its CUDA kernels are tuned for

AttnMask = torch.Tensor | BlockMask | None


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` is flex on CUDA and sdpa elsewhere (CPU has no fused flex kernel with a backward)."""
    if backend == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return backend


def attention_mask(backend: str, doc_ids_BT: torch.Tensor | None, T: int, device: torch.device) -> AttnMask:
    """What :func:`attend` takes for one micro-batch: None (causal SDPA), the dense document mask, or a BlockMask."""
    if resolve_backend(backend, device) == "flex":
        return block_mask(doc_ids_BT, T, device)
    return None if doc_ids_BT is None else document_causal_mask(doc_ids_BT)


def attend(q_BHTK: torch.Tensor, k_BHTK: torch.Tensor, v_BHTV: torch.Tensor, mask: AttnMask,
           scale: float) -> torch.Tensor:
    """[B, H, T, V]; v_head_dim may differ from the q/k head dim (both kernels accept that)."""
    if isinstance(mask, BlockMask):
        if q_BHTK.device.type == "cuda":
            return _compiled_flex_attention()(q_BHTK, k_BHTK, v_BHTV, block_mask=mask, scale=scale)
        return flex_attention_eager(q_BHTK, k_BHTK, v_BHTV, mask, scale)
    return F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTV, attn_mask=mask, is_causal=mask is None,
                                          scale=scale)


@functools.cache
def _compiled_flex_attention():
    """flex_attention compiled once for the process, as torchtitan does: uncompiled, it scores every pair densely.
    Inside a compiled block (train.compile) dynamo inlines it. NOTE: made on first use, not at import: torch.compile
    imports inductor (~2 s), which every CPU process (and the launcher's ranks) would otherwise pay."""
    return torch.compile(flex_attention)


# ------------------------------------------------------------------------------------------------------ masks
def document_causal_mask(doc_ids_BT: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, T, T]: token i attends to j iff j <= i and both belong to the same packed document."""
    T = doc_ids_BT.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids_BT.device).tril()
    same_doc = doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :]
    return (causal & same_doc).unsqueeze(1)


def block_mask(doc_ids_BT: torch.Tensor | None, T: int, device: torch.device) -> BlockMask:
    """The BlockMask of :func:`document_causal_mask` (causal alone when doc_ids_BT is None), from [B, N] tile
    summaries only.

    Contract: document ids never decrease along T (packed documents, as moetrain.data's document_positions numbers
    them). Then the tokens of a tile span a contiguous range of documents, and for key tile j before query tile i
    some pair shares a document iff j's last document is i's first, and every pair does iff j's first document is
    i's last. The diagonal tile is always partial (causal inside it).
    """
    n = -(-T // BLOCK)
    tiles = torch.arange(n, device=device)
    before_NN = tiles[None, :] < tiles[:, None]  # [query tile, key tile]
    diagonal_NN = tiles[None, :] == tiles[:, None]
    if doc_ids_BT is None:
        full_BNN, partial_BNN = before_NN[None], diagonal_NN[None]
        mask_mod = _causal
    else:
        first_BN = doc_ids_BT[:, tiles * BLOCK]
        last_BN = doc_ids_BT[:, ((tiles + 1) * BLOCK).clamp(max=T) - 1]
        full_BNN = before_NN & (first_BN[:, None, :] == last_BN[:, :, None])
        reached_BNN = diagonal_NN | (before_NN & (last_BN[:, None, :] == first_BN[:, :, None]))
        partial_BNN = reached_BNN & ~full_BNN
        mask_mod = _document_causal(doc_ids_BT)
    counts, indices = _kv_blocks(partial_BNN)
    full_counts, full_indices = _kv_blocks(full_BNN)
    return BlockMask.from_kv_blocks(counts, indices, full_counts, full_indices, BLOCK_SIZE=BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(T, T))


def _kv_blocks(listed_BNN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention's layout of a tile set: per query tile the count [B, 1, N] and the key tiles [B, 1, N, N],
    listed ones first in ascending order (int32, a head dim of 1 shared by all heads)."""
    counts = listed_BNN.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~listed_BNN).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[:, None], indices[:, None]


def _causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def _document_causal(doc_ids_BT: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (doc_ids_BT[b, q_idx] == doc_ids_BT[b, kv_idx])
    return mask_mod


# ------------------------------------------------------------------------------------------- startup log
def describe_backend(cfg, device: torch.device, dtype: torch.dtype, seq_len: int, document_mask: bool) -> str:
    """The attention that runs, for the startup log: flex, or which of SDPA's kernels takes MLA's shapes."""
    if resolve_backend(cfg.attn.backend, device) == "flex":
        how = "torch.compile'd" if device.type == "cuda" else "eager reference, dense scores"
        mask = "per-document causal" if document_mask else "causal"
        return f"flex (FlexAttention, {how}; {mask} block mask of {BLOCK}-token tiles)"
    return f"sdpa, {sdpa_backend(cfg, device, dtype, seq_len, document_mask)}"


def sdpa_backend(cfg, device: torch.device, dtype: torch.dtype, seq_len: int, document_mask: bool) -> str:
    """Which of SDPA's kernels MLA's attention gets at these shapes (the first that can run, in SDPA's order):
    MLA's head dims (192 for q/k, 128 for v) and dense document masks can keep it off flash attention."""
    if device.type != "cuda":
        return f"{device.type} (SDPA's {device.type} kernels)"
    from torch.backends import cuda

    a = cfg.attn
    q = torch.empty(1, a.n_heads, seq_len, a.qk_nope_head_dim + a.qk_rope_head_dim, device=device, dtype=dtype)
    v = torch.empty(1, a.n_heads, seq_len, a.v_head_dim, device=device, dtype=dtype)
    mask = torch.empty(1, 1, seq_len, seq_len, device=device, dtype=torch.bool) if document_mask else None
    try:
        params = cuda.SDPAParams(q, q, v, mask, 0.0, mask is None, False)
    except TypeError as e:  # the signature follows the torch version
        return f"unknown ({e})"
    for name, check in (("cudnn", "can_use_cudnn_attention"), ("flash", "can_use_flash_attention"),
                        ("memory-efficient", "can_use_efficient_attention")):
        fn = getattr(cuda, check, None)
        if fn is not None and fn(params, False):
            return name
    return "math (no fused kernel accepts these shapes)"
