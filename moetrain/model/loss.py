"""Cross entropy of the output head computed chunk by chunk, never holding more than one chunk's logits.

The plain loss (``F.cross_entropy(head(h).float(), ...)``) keeps the [N, V] logits in the compute dtype and
their fp32 copy until backward: at DeepSeek-V3's vocabulary (129280) that is ~1.5 MB per token for each head.
:func:`chunked_ce_sum` keeps only the head's input, its weight, the labels and one fp32 log-sum-exp per token;
backward recomputes each chunk's logits and turns them into the gradients of h and of the weight at once (the
approach of Liger-Kernel's fused linear cross entropy and of "Cut Your Losses in Large-Vocabulary Language
Models"), so forward and backward each hold one chunk's [C, V] logits and their fp32 copy at a time.

Why an autograd Function and not ``checkpoint(head, h_chunk)``: backward calls no module, so it does not depend on
whether a data-parallel wrapper (FSDP2) still has the head's parameters gathered when backward reaches the loss;
the weight it uses is the tensor the forward read.

Shapes: N tokens (B * T), D model dim, V vocabulary, C tokens of one chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value excluded from the loss (as moetrain.model.transformer's)


def chunked_ce_sum(h_ND: torch.Tensor, w_VD: torch.Tensor, labels_N: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """``sum_i CE(h_i W^T, label_i)`` over tokens whose label is not IGNORE_INDEX, as a 0-dim fp32 tensor.

    Each chunk's logits are computed in the compute dtype (what autocast makes of ``F.linear(h, W)``, as the head
    would) and the softmax in fp32; backward recomputes them in the same dtype.
    """
    if chunk_tokens < 1:
        raise ValueError(f"train.loss_chunk_tokens: a chunk needs at least one token, got {chunk_tokens}")
    return _ChunkedCrossEntropy.apply(h_ND, w_VD, labels_N, chunk_tokens)


def _row_loss_terms(logits_CV: torch.Tensor, labels_C: torch.Tensor):
    """(fp32 logits, log-sum-exp per row, target mask, labels with the ignored ones made a valid index)."""
    logits32_CV = logits_CV.float()
    valid_C = labels_C != IGNORE_INDEX
    return logits32_CV, torch.logsumexp(logits32_CV, dim=-1), valid_C, labels_C.where(valid_C, 0)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, labels_N, chunk_tokens):
        N = h_ND.shape[0]
        lse_N = torch.empty(N, dtype=torch.float32, device=h_ND.device)
        total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        compute_dtype = torch.promote_types(h_ND.dtype, w_VD.dtype)
        for s in range(0, N, chunk_tokens):
            # Under autocast F.linear runs in the autocast dtype, as self.head(h) would.
            logits_CV = F.linear(h_ND[s:s + chunk_tokens], w_VD)
            compute_dtype = logits_CV.dtype
            logits32_CV, lse_C, valid_C, target_C = _row_loss_terms(logits_CV, labels_N[s:s + chunk_tokens])
            del logits_CV
            target_logit_C = logits32_CV.gather(1, target_C[:, None]).squeeze(1)
            total += torch.where(valid_C, lse_C - target_logit_C, 0.0).sum()
            lse_N[s:s + chunk_tokens] = lse_C
        ctx.save_for_backward(h_ND, w_VD, labels_N, lse_N)
        ctx.chunk_tokens, ctx.compute_dtype = chunk_tokens, compute_dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h_ND, w_VD, labels_N, lse_N = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        C, dtype = ctx.chunk_tokens, ctx.compute_dtype
        grad_h_ND = torch.empty_like(h_ND) if need_h else None
        grad_w_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if need_w else None
        # NOTE: the matmuls are cast by hand to the forward's compute dtype: backward may run outside the autocast
        # region the forward ran in (the runner calls backward after leaving it).
        with torch.autocast(h_ND.device.type, enabled=False):
            w_cd = w_VD.to(dtype)
            for s in range(0, h_ND.shape[0], C):
                h_CD = h_ND[s:s + C].to(dtype)
                labels_C = labels_N[s:s + C]
                # d(lse - z_y)/dz = softmax(z) - onehot(y), zero on ignored rows; built in place in the fp32 copy.
                probs_CV = F.linear(h_CD, w_cd).float().sub_(lse_N[s:s + C, None]).exp_()
                valid_C = labels_C != IGNORE_INDEX
                probs_CV.scatter_add_(1, labels_C.where(valid_C, 0)[:, None],
                                      torch.full_like(probs_CV[:, :1], -1.0))
                grad_logits_CV = probs_CV.mul_(torch.where(valid_C, grad_total, 0.0)[:, None]).to(dtype)
                del probs_CV
                if need_h:
                    grad_h_ND[s:s + C] = grad_logits_CV @ w_cd
                if need_w:
                    grad_w_VD += (grad_logits_CV.T @ h_CD).float()
        return grad_h_ND, None if grad_w_VD is None else grad_w_VD.to(w_VD.dtype), None, None
