"""DeepSeek-V3's fine-grained FP8 quantisation: E4M3 values with one fp32 scale per tile or block.

Activations (and activation gradients) take one scale per 1 x 128 tile along a row, weights one per 128 x 128
block (DeepSeek-V3 report, 3.3.2). A tile or block at the edge of a dimension that is not a multiple of 128 is
simply shorter; scales may be rounded up to powers of two (an exact rescaling, as in DeepSeek's kernels).

A non-finite value makes its whole tile or block non-finite (its scale is inf or nan): the trainer's non-finite
step check catches it.

Also the coarser scalings torch's scaled GEMMs take (:mod:`moetrain.precision.scaled_gemm`): one scale per row
(``RowWise``: per token for activations, per output channel for weights) and one per matrix (``TensorWise``, the
``current`` recipe).

Shapes: M rows, K columns; G = ceil(K / 128) tiles per row; R = ceil(M / 128) row blocks.
"""

from __future__ import annotations

import torch

FP8_BLOCK = 128  # tile length and block side
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
_TINY = 1e-12  # amax of an all-zero tile: any positive scale quantises it exactly to zero


def _scale(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    scale = amax.float().clamp_min(_TINY) / E4M3_MAX
    return torch.exp2(torch.ceil(torch.log2(scale))) if pow2 else scale


def _pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    pad = -x.shape[dim] % multiple
    if not pad:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def quantize_tiles(x_MK: torch.Tensor, pow2: bool = False, tile: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_MK in E4M3, scale_MG in fp32) with ``x ~ q * scale`` per 1 x ``tile`` tile of the last dim."""
    K = x_MK.shape[-1]
    tiles = _pad_to(x_MK.float(), -1, tile).unflatten(-1, (-1, tile))  # [..., G, tile]
    scale = _scale(tiles.abs().amax(dim=-1), pow2)
    q = (tiles / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q.flatten(-2)[..., :K], scale


def dequantize_tiles(q_MK: torch.Tensor, scale_MG: torch.Tensor, tile: int = FP8_BLOCK) -> torch.Tensor:
    """fp32 ``q * scale`` per 1 x ``tile`` tile."""
    return q_MK.float() * scale_MG.repeat_interleave(tile, dim=-1)[..., :q_MK.shape[-1]]


def quantize_blocks(w_MK: torch.Tensor, pow2: bool = False, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_MK in E4M3, scale_RG in fp32) per ``block`` x ``block`` block of the last two dims (any leading dims,
    e.g. one [E, O, I] tensor of experts: every expert's blocks are its own)."""
    M, K = w_MK.shape[-2:]
    padded = _pad_to(_pad_to(w_MK.float(), -1, block), -2, block)
    blocks = padded.unflatten(-1, (-1, block)).unflatten(-3, (-1, block))  # [..., R, block, G, block]
    scale = _scale(blocks.abs().amax(dim=(-3, -1)), pow2)  # [..., R, G]
    q = (blocks / scale[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q.flatten(-2).flatten(-3, -2)[..., :M, :K], scale


def dequantize_blocks(q_MK: torch.Tensor, scale_RG: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """fp32 ``q * scale`` per ``block`` x ``block`` block (also DeepSeek's released ``weight_scale_inv`` format)."""
    M, K = q_MK.shape[-2:]
    scale = scale_RG.float().repeat_interleave(block, dim=-2)[..., :M, :].repeat_interleave(block, dim=-1)[..., :K]
    return q_MK.float() * scale


def fake_quantize_tiles(x: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """``x`` through 1 x 128 E4M3 tiles and back, in ``x``'s dtype."""
    return dequantize_tiles(*quantize_tiles(x, pow2)).to(x.dtype)


def fake_quantize_blocks(w: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """``w`` through 128 x 128 E4M3 blocks and back, in ``w``'s dtype."""
    return dequantize_blocks(*quantize_blocks(w, pow2)).to(w.dtype)


def quantize_rows(x_MK: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_MK in E4M3, scale_M in fp32), one scale per row of the last dim (any leading dims)."""
    x = x_MK.float()
    scale = _scale(x.abs().amax(dim=-1), pow2)
    return (x / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def dequantize_rows(q_MK: torch.Tensor, scale_M: torch.Tensor) -> torch.Tensor:
    """fp32 ``q * scale`` per row."""
    return q_MK.float() * scale_M.unsqueeze(-1)


def quantize_tensor(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(q in E4M3, scale in fp32 of shape [..., 1, 1]), one scale per matrix (the last two dims)."""
    x = x.float()
    scale = _scale(x.abs().amax(dim=(-2, -1), keepdim=True), pow2)
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def dequantize_tensor(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def fake_quantize_tensor(x: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """``x`` through E4M3 with one scale per matrix (the last two dims; "current" scaling), in ``x``'s dtype."""
    return dequantize_tensor(*quantize_tensor(x, pow2)).to(x.dtype)
