"""Expert-parallel token dispatch: routed token copies travel by all-to-all to the rank that holds their expert.

Swapped into ``MoE.dispatcher`` from outside (the model never imports torch.distributed); same seam as
:class:`moetrain.model.dispatch.LocalDispatcher`. Rank ``r`` of an ep group of size P holds the contiguous expert
block ``[r*L, (r+1)*L)``, L = E/P, the layout DeepSpeed's and torchtitan's expert sharding use.

Shapes: T tokens on this rank, K experts per token, N = T*K routed copies, D model dim, E experts, L = E/P local
experts, P ep ranks, S copies sent (N less capacity drops), R rows received from all ranks, M = R plus per-expert
padding (the rows the experts see).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from moetrain.model.dispatch import expert_counts
from moetrain.model.layers import is_recomputing


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; its backward is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    # NOTE: contiguous: collectives need it, and torch._grouped_mm's backward rejects expanded gradients.
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


@dataclass
class EPDispatchContext:
    order_S: torch.Tensor  # flat [T*K] routing position of each copy sent, in send order (kept copies only)
    dest_R: torch.Tensor  # row of the [M] expert input that each received row went to
    send_splits: list[int]  # copies sent to each ep rank
    recv_splits: list[int]  # rows received from each ep rank
    topk_weight_TK: torch.Tensor


class AllToAllDispatcher:
    """Dispatch to the ep rank holding each expert; combine by the reverse exchange and a weighted gather.

    ``dispatch`` returns ``(tokens_MD, counts_L, ctx)``: this rank's expert inputs, expert-major (all rows of local
    expert 0 from every source rank, then expert 1, ...), and ``counts_L``, the rows per local expert summed over
    source ranks, padded to a multiple of ``pad_to`` with zero rows (FP8 grouped GEMMs want aligned groups).
    Padding rows are stripped in ``combine``. Gradients reach ``x_TD`` and ``topk_weight_TK`` as with
    :class:`LocalDispatcher`; the combine is the same deterministic [1, K] x [K, D] matmul.

    ``capacity_factor``: dropless when None. Otherwise each source rank sends each expert at most
    ``ceil(capacity_factor * T*K / E)`` copies, keeping the earliest tokens (flat ``(token, k)`` order; GShard's
    position policy, so the choice never depends on the gate values); a dropped copy contributes zero to its
    token's output and its gate weight gets zero gradient. ``last_dropped_fraction`` holds this rank's share of
    dropped copies in the last ``dispatch``.

    Host transfer: one ``.tolist()`` of a [2P + 2] tensor per dispatch (split sizes, padded rows, dropped copies).
    """

    def __init__(self, n_experts: int, ep_group, pad_to: int = 1, capacity_factor: float | None = None):
        self.ep_size = dist.get_world_size(ep_group)
        if n_experts % self.ep_size:
            raise ValueError(f"parallel.ep={self.ep_size} must divide model.moe.n_routed_experts={n_experts}")
        if pad_to < 1:
            raise ValueError(f"pad_to must be >= 1, got {pad_to}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {capacity_factor}")
        self.n_experts, self.group, self.pad_to, self.capacity_factor = n_experts, ep_group, pad_to, capacity_factor
        self.n_local_experts = n_experts // self.ep_size
        self.ep_rank = dist.get_rank(ep_group)
        self.last_dropped_fraction = 0.0
        # For metrics, since the trainer last read them (pop_dispatch_stats): distinct ep ranks summed over tokens,
        # tokens, dropped copies, routed copies.
        self._ranks_sum: torch.Tensor | float = 0.0
        self._tokens = self._dropped = self._copies = 0

    def dispatch(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor):
        (T, K), E, L, P = topk_idx_TK.shape, self.n_experts, self.n_local_experts, self.ep_size
        counted = not is_recomputing()  # metrics count each real forward once
        if T and counted:
            with torch.no_grad():
                self._ranks_sum += routing_ranks_per_token(topk_idx_TK, E, P) * T
        flat_idx_N = topk_idx_TK.flatten()
        order_N = torch.argsort(flat_idx_N, stable=True)  # expert-major, so also destination-rank-major
        counts_E = expert_counts(flat_idx_N, E)
        order_S, counts_E = self._apply_capacity(flat_idx_N, order_N, counts_E, T * K)

        # Each rank learns how many rows of each of its experts every source sends: [P, L] after the exchange.
        recv_counts_PL = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts_PL, counts_E, group=self.group)
        recv_counts_PL = recv_counts_PL.view(P, L)
        counts_L = recv_counts_PL.sum(0)
        padded_L = (counts_L + self.pad_to - 1) // self.pad_to * self.pad_to
        n_dropped = torch.tensor([T * K], device=counts_E.device) - counts_E.sum().view(1)
        sizes = torch.cat([counts_E.view(P, L).sum(1), recv_counts_PL.sum(1), padded_L.sum().view(1), n_dropped])
        sizes = sizes.tolist()  # the one host sync of the layer
        send_splits, recv_splits, M, dropped = sizes[:P], sizes[P:2 * P], sizes[2 * P], sizes[2 * P + 1]
        self.last_dropped_fraction = dropped / (T * K) if T else 0.0
        if counted:
            self._tokens, self._dropped, self._copies = self._tokens + T, self._dropped + dropped, self._copies + T * K

        # index_select, not x_TD[...]: its backward (index_add) is ~2.5x faster on CPU than indexing's index_put.
        recv_RD = _AllToAll.apply(x_TD.index_select(0, order_S // K), recv_splits, send_splits, self.group)
        # Rows arrive source-major (each source's rows sorted by expert); the experts want them expert-major,
        # each expert's group starting at its padded offset.
        R = sum(recv_splits)
        local_expert_R = torch.repeat_interleave(torch.arange(L, device=counts_L.device).repeat(P),
                                                 recv_counts_PL.flatten(), output_size=R)
        perm_R = torch.argsort(local_expert_R, stable=True)
        expert_sorted_R = local_expert_R[perm_R]
        shift_L = _exclusive_cumsum(padded_L) - _exclusive_cumsum(counts_L)  # padding before each expert's group
        dest_sorted_R = torch.arange(R, device=perm_R.device) + shift_L[expert_sorted_R]
        dest_R = torch.empty_like(perm_R).scatter_(0, perm_R, dest_sorted_R)
        tokens_MD = recv_RD.new_zeros(M, x_TD.shape[1]).index_copy(0, dest_R, recv_RD)
        return tokens_MD, padded_L, EPDispatchContext(order_S, dest_R, send_splits, recv_splits, topk_weight_TK)

    def combine(self, y_MD: torch.Tensor, ctx: EPDispatchContext) -> torch.Tensor:
        (T, K), D = ctx.topk_weight_TK.shape, y_MD.shape[1]
        y_sent_SD = _AllToAll.apply(y_MD.index_select(0, ctx.dest_R), ctx.send_splits, ctx.recv_splits, self.group)
        # Zeros: a dropped copy adds nothing to its token. D spelled out: T may be 0 on this rank.
        y_TKD = y_sent_SD.new_zeros(T * K, D).index_copy(0, ctx.order_S, y_sent_SD).view(T, K, D)
        w_T1K = ctx.topk_weight_TK.to(y_MD.dtype).unsqueeze(1)
        return torch.bmm(w_T1K, y_TKD).squeeze(1)

    def _apply_capacity(self, flat_idx_N, order_N, counts_E, n_copies: int):
        """Keep the first ``capacity`` copies of each expert in routing order; returns (order_S, kept counts_E)."""
        if self.capacity_factor is None:
            return order_N, counts_E
        capacity = math.ceil(self.capacity_factor * n_copies / self.n_experts)
        expert_sorted_N = flat_idx_N[order_N]
        rank_in_expert_N = torch.arange(n_copies, device=order_N.device) - _exclusive_cumsum(counts_E)[expert_sorted_N]
        return order_N[rank_in_expert_N < capacity], counts_E.clamp(max=capacity)


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def routing_ranks_per_token(topk_idx_TK: torch.Tensor, n_experts: int, ep: int) -> torch.Tensor:
    """Mean number of distinct ep ranks a token's copies go to (0-dim float tensor; NaN when T = 0).

    With contiguous expert blocks and group-limited routing where ``n_group == ep``, each group is one rank, so
    this is at most ``topk_group``: the all-to-all fan-out that group-limited routing exists to bound.
    """
    rank_TK = topk_idx_TK // (n_experts // ep)
    hit_TP = torch.zeros(topk_idx_TK.shape[0], ep, dtype=torch.bool, device=topk_idx_TK.device)
    return hit_TP.scatter_(1, rank_TK, True).sum(1).float().mean()


# ------------------------------------------------------------------------------------------- applying it
def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh, capacity_factor: float | None = None) -> None:
    """Give every MoE layer the all-to-all dispatcher and only its ep rank's experts (before FSDP, on meta).

    The stacked expert weights become DTensors sharded over the ep ranks (``Shard(0)``): parameter names and
    global shapes stay those of the model, so checkpoints reshard across ep sizes, and the experts module (plain
    or FP8) runs its grouped GEMM on this rank's block (:meth:`GroupedExperts.local_weights`)."""
    from moetrain.model.moe import MoE

    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        experts = moe.experts
        for name in ("w1", "w2", "w3"):
            full = getattr(experts, name)
            setattr(experts, name, nn.Parameter(distribute_tensor(full.data, ep_mesh, [Shard(0)]),
                                                requires_grad=full.requires_grad))
        moe.dispatcher = AllToAllDispatcher(experts.n_experts, ep_mesh.get_group(), capacity_factor=capacity_factor)


def pop_dispatch_stats(model: nn.Module) -> torch.Tensor | None:
    """[4] sums over this rank's MoE layers since the last call (then reset): distinct ep ranks over tokens, tokens,
    dropped copies, routed copies; None without expert parallelism. Sum over ranks, then take the ratios."""
    rows = []
    for module in model.modules():
        d = getattr(module, "dispatcher", None)
        if isinstance(d, AllToAllDispatcher):
            rows.append(torch.tensor([float(d._ranks_sum), d._tokens, d._dropped, d._copies], dtype=torch.float64))
            d._ranks_sum, d._tokens, d._dropped, d._copies = 0.0, 0, 0, 0
    return torch.stack(rows).sum(0) if rows else None
