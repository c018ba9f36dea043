"""Token dispatch: group routed token copies by expert, and combine expert outputs back per token.

The MoE layer only talks to this interface; expert parallelism swaps in a dispatcher that adds an all-to-all.

Shapes: T tokens, K experts per token, N = T*K routed copies, D model dim, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def expert_counts(idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Copies routed to each expert (int64 [E]) of the flat expert ids ``idx``.

    NOTE: scatter_add, not bincount: bincount reads its input's maximum on the host to size the output, a sync
    per MoE layer on a GPU."""
    return torch.zeros(n_experts, dtype=torch.long, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))


@dataclass
class DispatchContext:
    order_N: torch.Tensor  # position in the flat [T*K] routing list of each sorted copy
    topk_weight_TK: torch.Tensor


class LocalDispatcher:
    """All experts live in this process: a stable sort by expert id, then a weighted gather back.

    Combining gathers the K outputs of each token and reduces them with a [1, K] x [K, D] matmul instead of an
    atomic scatter-add, so results are deterministic on every device.
    """

    def __init__(self, n_experts: int):
        self.n_experts = n_experts

    def dispatch(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor):
        K = topk_idx_TK.shape[1]
        flat_idx_N = topk_idx_TK.flatten()
        order_N = torch.argsort(flat_idx_N, stable=True)
        counts_E = expert_counts(flat_idx_N, self.n_experts)
        tokens_ND = x_TD[order_N // K]
        return tokens_ND, counts_E, DispatchContext(order_N, topk_weight_TK)

    def combine(self, y_ND: torch.Tensor, ctx: DispatchContext) -> torch.Tensor:
        T, K = ctx.topk_weight_TK.shape
        y_unsorted_ND = torch.empty_like(y_ND).index_copy_(0, ctx.order_N, y_ND)
        y_TKD = y_unsorted_ND.view(T, K, y_ND.shape[-1])  # D spelled out: -1 is ambiguous when T = 0
        w_T1K = ctx.topk_weight_TK.to(y_ND.dtype).unsqueeze(1)
        return torch.bmm(w_T1K, y_TKD).squeeze(1)
