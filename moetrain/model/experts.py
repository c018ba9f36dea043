"""Routed experts: E SwiGLU FFNs run over tokens already sorted by expert.

The grouped matmul is one method, :meth:`GroupedExperts.grouped_mm`, so an FP8 provider can override it (or swap
the module) and use the dispatcher's per-expert counts as its ``m_splits``.

Shapes: N routed token copies (sorted by expert), E experts, D model dim, F expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moetrain._compat import compile_disabled, grouped_mm, has_grouped_mm
from moetrain.model.layers import uninitialised

# torch._grouped_mm wants 16-byte aligned row strides and fp32/bf16/fp16 operands.
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_GROUPED_MM_ALIGN_BYTES = 16


def grouped_mm_supported(x_ND: torch.Tensor, w_EOI: torch.Tensor) -> bool:
    if x_ND.dtype not in _GROUPED_MM_DTYPES or w_EOI.dtype != x_ND.dtype or not has_grouped_mm():
        return False
    return all((n * x_ND.element_size()) % _GROUPED_MM_ALIGN_BYTES == 0 for n in w_EOI.shape[1:])


class GroupedExperts(nn.Module):
    def __init__(self, n_experts: int, dim: int, inter_dim: int, use_grouped_mm: bool = True):
        super().__init__()
        self.n_experts, self.use_grouped_mm = n_experts, use_grouped_mm
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # gate, per expert [F, D] like nn.Linear
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # up
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))  # down

    @classmethod
    def sharing(cls, experts: "GroupedExperts") -> "GroupedExperts":
        """A ``cls`` (an FP8 provider's subclass) holding ``experts``' own Parameters: same names, shapes, values."""
        new = uninitialised(cls)
        new.n_experts, new.use_grouped_mm = experts.n_experts, experts.use_grouped_mm
        new.w1, new.w3, new.w2 = experts.w1, experts.w3, experts.w2
        return new

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_ND holds counts_E[0] tokens of expert 0, then counts_E[1] of expert 1, ...; returns y_ND likewise."""
        w1, w3, w2 = self.local_weights()
        h_NF = F.silu(self.grouped_mm(x_ND, w1, counts_E)) * self.grouped_mm(x_ND, w3, counts_E)
        return self.grouped_mm(h_NF, w2, counts_E)

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1, w3, w2) of the experts this process computes: under expert parallelism the weights are distributed
        tensors (``Shard(0)`` over the ep ranks, global names and shapes) and this process computes its block."""
        return tuple(w.to_local() if hasattr(w, "to_local") else w for w in (self.w1, self.w3, self.w2))

    def grouped_mm(self, x_NI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Per expert e: rows of x_NI belonging to e times w_EOI[e]^T. The seam FP8 providers override.

        Under autocast both operands take its dtype: autocast does not cover ``_grouped_mm``, and the residual
        stream (fp32 norms) hands the experts fp32 activations, which would keep the GEMM in fp32 (on CUDA:
        the per-expert fallback)."""
        if torch.is_autocast_enabled(x_NI.device.type):
            x_NI = x_NI.to(torch.get_autocast_dtype(x_NI.device.type))
        w_EOI = w_EOI.to(x_NI.dtype)
        if self.use_grouped_mm and grouped_mm_supported(x_NI, w_EOI):
            offs = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
            if x_NI.dtype == torch.bfloat16:
                return grouped_mm(x_NI, w_EOI.transpose(-2, -1), offs)
            return _grouped_mm_eager(x_NI, w_EOI.transpose(-2, -1), offs)
        return expert_loop_mm(x_NI, w_EOI, counts_E)


@compile_disabled
def _grouped_mm_eager(x_NI: torch.Tensor, w_EIO: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    # NOTE: eager kernels take fp32 (CPU), but the compiler's shape rules accept only bf16; keep fp32 out of graphs.
    return grouped_mm(x_NI, w_EIO, offs)


def expert_loop_mm(x_NI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Reference path: one matmul per expert (any dtype/device)."""
    outs = [x @ w_EOI[e].T for e, x in enumerate(x_NI.split(counts_E.tolist(), dim=0))]
    return torch.cat(outs, dim=0) if outs else x_NI.new_empty(0, w_EOI.shape[1])
