"""DeepSeekMoE layer: shared experts plus routed experts behind a router and a token dispatcher.

Shapes: B batch, T tokens per sequence, D model dim, E routed experts, K experts per token.
"""

from __future__ import annotations

import torch
from torch import nn

from moetrain.model.config import ModelConfig
from moetrain.model.dispatch import LocalDispatcher
from moetrain.model.experts import GroupedExperts
from moetrain.model.layers import MLP, is_recomputing
from moetrain.model.router import Router, sequence_balance_loss


class _AttachSideLoss(torch.autograd.Function):
    """Identity on ``x``; in backward, feeds ``scale`` as the gradient of ``loss``.

    This lets the balance loss reach the backward pass from inside any pipeline stage without being an output
    of the stage (the same trick as Megatron-Core's aux-loss scaler).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(loss)
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad_x, torch.full_like(loss, ctx.scale), None


class MoE(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        self.layer_id, self.topk, self.alpha = layer_id, m.router.topk, m.router.balance_loss_alpha
        self.gate = Router(cfg.dim, m.n_routed_experts, m.router, layer_id)
        self.experts = GroupedExperts(m.n_routed_experts, cfg.dim, m.moe_inter_dim, m.grouped_mm)
        self.shared_experts = MLP(cfg.dim, m.n_shared_experts * m.moe_inter_dim) if m.n_shared_experts else None
        self.dispatcher = LocalDispatcher(m.n_routed_experts)
        # Gradient weight of this layer's balance loss; the trainer sets it to match its loss normalisation.
        self.balance_loss_scale = 1.0
        # Detached sum of the balance losses of the forwards since it was last read (see balance.pop_balance_loss):
        # several micro-batches may be in flight before a pipeline stage reports.
        self.balance_loss_sum: torch.Tensor | None = None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        topk_idx_TK, topk_weight_TK, scores_TE = self.gate(x_TD)
        tokens_ND, counts_E, ctx = self.dispatcher.dispatch(x_TD, topk_idx_TK, topk_weight_TK)
        out_TD = self.dispatcher.combine(self.experts(tokens_ND, counts_E), ctx)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        if self.training and self.alpha > 0 and torch.is_grad_enabled():
            loss = sequence_balance_loss(scores_TE.view(B, T, -1), self.topk, self.alpha)
            if not is_recomputing():
                prev = self.balance_loss_sum
                self.balance_loss_sum = loss.detach() if prev is None else prev + loss.detach()
            out_TD = _AttachSideLoss.apply(out_TD, loss, self.balance_loss_scale)
        return out_TD.view(B, T, D)
