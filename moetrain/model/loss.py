"""Cross entropy of the output head computed chunk by chunk, never holding more than one chunk's logits.

The plain loss (``F.cross_entropy(head(h).float(), ...)``) keeps the [N, V] logits in the compute dtype and
their fp32 log-softmax until backward, which adds their fp32 gradient: at DeepSeek-V3's vocabulary (129280) and
bf16, 0.8 MB per token kept for the main head, 0.5 MB for each MTP head, 0.5 MB more while backward runs.
:func:`chunked_ce_sum` keeps only the head's input, its weight, the labels and one fp32 log-sum-exp per token;
forward computes the logits ``chunk_tokens`` rows at a time, backward recomputes them in blocks of as many elements
and turns each block into its share of the gradients of h and of the weight at once (the approach of Liger-Kernel's
fused linear cross entropy and of "Cut Your Losses in Large-Vocabulary Language Models"), so neither pass holds
more than ``chunk_tokens x V`` logits, in the compute dtype and in fp32, at a time.

Why an autograd Function and not ``checkpoint(head, h_chunk)``: backward calls no module, so it does not depend on
whether a data-parallel wrapper (FSDP2) still has the head's parameters gathered when backward reaches the loss;
the weight it uses is the tensor the forward read.

Shapes: N tokens (B * T), D model dim, V vocabulary, C tokens of one chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value excluded from the loss


def chunked_ce_sum(h_ND: torch.Tensor, w_VD: torch.Tensor, labels_N: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """``sum_i CE(h_i W^T, label_i)`` over tokens whose label is not IGNORE_INDEX, as a 0-dim fp32 tensor.

    Each chunk's logits are computed in the compute dtype (what autocast makes of ``F.linear(h, W)``, as the head
    would) and the softmax in fp32; backward recomputes them in the same dtype.
    """
    if chunk_tokens < 1:
        raise ValueError(f"train.loss_chunk_tokens: a chunk needs at least one token, got {chunk_tokens}")
    return _ChunkedCrossEntropy.apply(h_ND, w_VD, labels_N, chunk_tokens)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Forward in token chunks (each row's log-sum-exp needs the whole vocabulary); backward in vocabulary blocks of
    the same size (``chunk_tokens * V / N`` columns for all N tokens), so that each block's weight gradient is one
    matmul written once, in the weight's dtype as the plain head's would be, and only h's gradient ([N, D], small
    beside the logits) accumulates, in fp32."""

    @staticmethod
    def forward(ctx, h_ND, w_VD, labels_N, chunk_tokens):
        N = h_ND.shape[0]
        lse_N = torch.empty(N, dtype=torch.float32, device=h_ND.device)
        total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        compute_dtype = torch.promote_types(h_ND.dtype, w_VD.dtype)
        for s in range(0, N, chunk_tokens):
            # Under autocast F.linear runs in the autocast dtype, as self.head(h) would; its output dies at .float().
            logits_CV = F.linear(h_ND[s:s + chunk_tokens], w_VD)
            compute_dtype = logits_CV.dtype
            logits_CV = logits_CV.float()
            labels_C = labels_N[s:s + chunk_tokens]
            valid_C = labels_C != IGNORE_INDEX
            target_logit_C = logits_CV.gather(1, labels_C.where(valid_C, 0)[:, None]).squeeze(1)
            # log-sum-exp in place (torch.logsumexp would allocate two more [C, V] temporaries)
            max_C = logits_CV.amax(dim=1)
            lse_C = logits_CV.sub_(max_C[:, None]).exp_().sum(dim=1).log_().add_(max_C)
            del logits_CV
            total += torch.where(valid_C, lse_C - target_logit_C, 0.0).sum()
            lse_N[s:s + chunk_tokens] = lse_C
        ctx.save_for_backward(h_ND, w_VD, labels_N, lse_N)
        ctx.chunk_tokens, ctx.compute_dtype = chunk_tokens, compute_dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h_ND, w_VD, labels_N, lse_N = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        dtype, (N, D), V = ctx.compute_dtype, h_ND.shape, w_VD.shape[0]
        block = max(1, ctx.chunk_tokens * V // max(N, 1))  # vocabulary columns per block: chunk_tokens x V elements
        grad_h32_ND = torch.zeros(N, D, dtype=torch.float32, device=h_ND.device) if need_h else None
        grad_w_VD = torch.empty_like(w_VD) if need_w else None
        valid_N = labels_N != IGNORE_INDEX
        # d(lse - z_y)/dz = softmax(z) - onehot(y), times the upstream gradient; zero on ignored rows.
        scale_N1 = torch.where(valid_N, grad_total, 0.0)[:, None]
        # NOTE: the matmuls are cast by hand to the forward's compute dtype: backward may run outside the autocast
        # region the forward ran in (the runner calls backward after leaving it).
        with torch.autocast(h_ND.device.type, enabled=False):
            h_cd = h_ND.to(dtype)
            for v in range(0, V, block):
                w_cd = w_VD[v:v + block].to(dtype)
                probs_NB = F.linear(h_cd, w_cd).float().sub_(lse_N[:, None]).exp_()
                # -1 at the label's column where the label falls in this block (no host sync: a masked scatter).
                here_N1 = (valid_N & (labels_N >= v) & (labels_N < v + block))[:, None]
                column_N1 = (labels_N[:, None] - v).clamp(0, probs_NB.shape[1] - 1)
                probs_NB.scatter_add_(1, column_N1, -here_N1.to(probs_NB.dtype))
                grad_logits_NB = probs_NB.mul_(scale_N1).to(dtype)
                del probs_NB
                if need_h:
                    if dtype == torch.float32:
                        grad_h32_ND.addmm_(grad_logits_NB, w_cd)
                    else:
                        grad_h32_ND += grad_logits_NB @ w_cd
                if need_w:
                    grad_w_VD[v:v + block] = grad_logits_NB.T @ h_cd
                del grad_logits_NB  # before the next block's logits: one block alive at a time
        grad_h_ND = None if grad_h32_ND is None else grad_h32_ND.to(h_ND.dtype)
        return grad_h_ND, grad_w_VD, None, None
