"""The trainer's MoE balance state across ranks: the per-step bias update and the balance metrics, on the device.

Once per optimizer step (:meth:`MoEStats.update`): every layer's expert counts are summed over the data-parallel
ranks (the global batch), the selection biases move (``b_i += gamma * sign(mean - load_i)``), and MaxVio and the
loads since the last record are kept on the device. Once per log step (:meth:`MoEStats.record`): one tensor of
every layer's numbers, completed over the pipeline ranks by one all-reduce, reaches the host in one transfer.

Rows are MoE layers in ascending global layer id (main blocks, then MTP blocks); a pipeline rank fills its own rows
and zeros elsewhere, so a sum over the pipeline group completes the table. Shapes: L MoE layers of the whole model,
E routed experts.
"""

from __future__ import annotations

import torch
from torch import nn

from moetrain.model import collect_expert_counts, update_expert_bias
from moetrain.model.balance import routers
from moetrain.model.config import ModelConfig
from moetrain.parallel.mesh import all_reduce_sum


def moe_layer_ids(cfg: ModelConfig) -> list[int]:
    """Global ids of every MoE layer of the whole model (main blocks past the dense ones, then MTP blocks)."""
    return [i for i in range(cfg.n_layers + cfg.n_mtp_layers) if i >= cfg.moe.first_k_dense_replace]


class MoEStats:
    def __init__(self, model: nn.Module, cfg: ModelConfig, device: torch.device, dp_group, pp_group,
                 expert_parallel: bool = False):
        self.model, self.device, self.expert_parallel = model, device, expert_parallel
        self.dp_group, self.pp_group = dp_group, pp_group
        self.all_ids = moe_layer_ids(cfg)
        self.n_experts = cfg.moe.n_routed_experts
        self._rows = [self.all_ids.index(r.layer_id) for r in routers(model)]  # this rank's rows of the table
        self._maxvio_L = torch.zeros(len(self._rows), device=device)  # of the last update
        self._load_LE = torch.zeros(len(self._rows), self.n_experts, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, gamma: float) -> None:
        """The step's bias update from the global batch's counts (every rank applies the same one); resets the
        routers' counts."""
        layer_ids, counts_LE = collect_expert_counts(self.model)
        counts_LE = all_reduce_sum(counts_LE.to(self.device), self.dp_group)
        if layer_ids:
            # NOTE: float64, exact past fp32's 2**24 for the counts of many large global batches.
            self._load_LE += counts_LE.double()
        self._maxvio_L = update_expert_bias(self.model, gamma, (layer_ids, counts_LE)).to(self.device)

    @torch.no_grad()
    def record(self) -> dict:
        """The metrics of every MoE layer (all pipeline ranks), read in one transfer; the loads restart."""
        # Columns: MaxVio of the last step, bias min, max, std, mean |bias|, then the E loads since the last record.
        table = torch.zeros(len(self.all_ids), 5 + self.n_experts, dtype=torch.float64, device=self.device)
        rs = routers(self.model)
        if rs:
            bias_LE = torch.stack([r.expert_bias for r in rs])
            mine = torch.cat([self._maxvio_L[:, None], bias_LE.amin(-1, keepdim=True), bias_LE.amax(-1, keepdim=True),
                              bias_LE.std(-1, unbiased=False, keepdim=True), bias_LE.abs().mean(-1, keepdim=True)],
                             dim=-1)
            table[self._rows] = torch.cat([mine.double(), self._load_LE], dim=-1)
        self._load_LE.zero_()
        # NOTE: a pipeline rank without MoE layers still joins the all-reduce, with zero rows.
        rows = all_reduce_sum(table, self.pp_group).tolist()
        if not rows:
            return {"max_violation": 0.0, "max_violation_per_layer": [], "expert_bias_abs_mean": 0.0,
                    "expert_load": [], **self._dispatch_record()}
        maxvio = [r[0] for r in rows]
        record = {"max_violation": sum(maxvio) / len(maxvio), "max_violation_per_layer": [round(v, 4) for v in maxvio],
                  "expert_bias_abs_mean": sum(r[4] for r in rows) / len(rows)}
        for i, name in enumerate(("min", "max", "std"), start=1):
            record[f"expert_bias_{name}_per_layer"] = [float(f"{r[i]:.5g}") for r in rows]
        # Tokens routed to each expert over the steps since the last record: a layer's row sums to topk x tokens.
        record["expert_load"] = [[round(v) for v in r[5:]] for r in rows]
        return {**record, **self._dispatch_record()}

    def _dispatch_record(self) -> dict:
        """Expert parallelism, over every token of the steps since the last record on all ranks: distinct ranks a
        token reaches, and the share of copies a capacity factor dropped."""
        if not self.expert_parallel:
            return {}
        from moetrain.parallel.expert_parallel import pop_dispatch_stats

        stats = pop_dispatch_stats(self.model).to(self.device)
        ranks, tokens, dropped, copies = all_reduce_sum(stats, self.dp_group).tolist()
        return {"routing_ranks_per_token": ranks / max(tokens, 1), "dropped_fraction": dropped / max(copies, 1)}
