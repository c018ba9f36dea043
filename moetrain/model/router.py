"""DeepSeekMoE router with group-limited top-k selection and an aux-loss-free selection bias.

Naming convention for router quantities (T tokens, E routed experts, G groups, K experts per token):
- ``logits_TE``: the fp32 gate output ``x @ W_gate^T``.
- ``scores_TE``: ``sigmoid(logits)`` (V3) or ``softmax(logits)`` (V2); the gate weights are taken from these.
- ``choice_TE``: ``scores + expert_bias``; used only to choose experts.
- ``group_scores_TG``: a group's score, the sum of its top-2 choice scores (max when there is no bias).
- ``topk_idx_TK`` / ``topk_weight_TK``: chosen experts and their gate weights (normalised when
  ``norm_topk_prob``, then times ``routed_scaling_factor``).

NOTE: ``expert_bias`` steers which experts are selected, never the gate weights; it is updated outside
``forward`` (see :mod:`moetrain.model.balance`), while ``forward`` only counts tokens per expert. Both are keyed by
``layer_id``, the global index of the block that holds the router (MTP blocks follow the main ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.model.config import RouterConfig
from moetrain.model.dispatch import expert_counts
from moetrain.model.layers import is_recomputing


class Router(nn.Module):
    def __init__(self, dim: int, n_routed_experts: int, cfg: RouterConfig, layer_id: int):
        super().__init__()
        self.cfg, self.layer_id = cfg, layer_id
        self.n_routed_experts = n_routed_experts
        self.weight = nn.Parameter(torch.empty(n_routed_experts, dim))
        # fp32 balance state: the bias is checkpointed; the counts cover the tokens since the last optimizer step.
        self.register_buffer("expert_bias", torch.zeros(n_routed_experts, dtype=torch.float32), persistent=True)
        self.register_buffer("tokens_per_expert", torch.zeros(n_routed_experts, dtype=torch.float32), persistent=False)

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``topk_idx_TK`` (int64), ``topk_weight_TK`` (fp32) and ``scores_TE`` (fp32)."""
        cfg = self.cfg
        with torch.autocast(x_TD.device.type, enabled=False):  # the gate stays fp32 under mixed precision
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        scores_TE = logits_TE.sigmoid() if cfg.scoring_func == "sigmoid" else logits_TE.softmax(dim=-1)
        choice_TE = scores_TE + self.expert_bias if cfg.selection_bias else scores_TE
        if cfg.n_group > 1:
            choice_TE = self._limit_to_groups(choice_TE)
        topk_idx_TK = choice_TE.topk(cfg.topk, dim=-1, sorted=False).indices
        topk_weight_TK = scores_TE.gather(-1, topk_idx_TK)
        if cfg.norm_topk_prob:
            topk_weight_TK = topk_weight_TK / (topk_weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
        topk_weight_TK = topk_weight_TK * cfg.routed_scaling_factor
        # NOTE: activation recomputation runs this forward again inside backward (is_recomputing): count once.
        if self.training and not is_recomputing():
            with torch.no_grad():
                self.tokens_per_expert += expert_counts(topk_idx_TK.flatten(), self.n_routed_experts)
        return topk_idx_TK, topk_weight_TK, scores_TE

    def _limit_to_groups(self, choice_TE: torch.Tensor) -> torch.Tensor:
        """Mask (to -inf) every expert outside the best ``topk_group`` of ``n_group`` groups."""
        cfg = self.cfg
        choice_TGe = choice_TE.unflatten(-1, (cfg.n_group, -1))
        if cfg.selection_bias:
            group_scores_TG = choice_TGe.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores_TG = choice_TGe.amax(dim=-1)
        keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
        keep_TG.scatter_(-1, group_scores_TG.topk(cfg.topk_group, dim=-1, sorted=False).indices, True)
        return choice_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).flatten(-2)


def sequence_balance_loss(scores_BTE: torch.Tensor, K: int, alpha: float) -> torch.Tensor:
    """Sequence-wise balance loss of the V3 report (eqs. 17-20), averaged over sequences.

    L = alpha * sum_i f_i P_i with, per sequence of T tokens, f_i = E / (K T) * #{t : s_{t,i} in TopK(s_t, K)} and
    P_i = 1/T sum_t s'_{t,i}, where s' = scores normalised to sum 1 over all experts.
    NOTE: f_i counts the top-K of the unbiased scores over all experts (eq. 18), not the routing choice, which the
    selection bias and group limit steer.
    """
    B, T, E = scores_BTE.shape
    with torch.no_grad():
        counts_BE = torch.zeros(B, E, device=scores_BTE.device, dtype=scores_BTE.dtype)
        idx_BN = scores_BTE.topk(K, dim=-1, sorted=False).indices.reshape(B, T * K)
        counts_BE.scatter_add_(1, idx_BN, torch.ones(idx_BN.shape, device=idx_BN.device, dtype=counts_BE.dtype))
        f_BE = counts_BE * (E / (K * T))
    p_BE = (scores_BTE / scores_BTE.sum(dim=-1, keepdim=True)).mean(dim=1)
    return alpha * (f_BE * p_BE).sum(dim=-1).mean()
