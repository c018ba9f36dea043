"""How this rank runs a step's micro-batches: the whole model (:class:`LocalRunner`) or its pipeline stages
(:class:`PipelineRunner`). The training loop is the same for both; every pipeline difference lives here.

Contract of :meth:`Runner.forward_backward`: the loss each micro-batch backpropagates is its share of the global
sum over ``n_tokens`` (the target tokens of the whole global batch); it returns this rank's sums of the lm loss,
the MTP loss (mean over depths, lambda-free) and the sequence-wise balance loss, for the metrics. The balance
loss adds its gradient inside backward (moetrain.model.moe), weighted by the micro-batch's share of the global
batch and the strategy's ``loss_scale``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from moetrain.model import pop_balance_loss, stage_lm_output
from moetrain.model.layers import is_recomputing
from moetrain.model.moe import MoE
from moetrain.parallel.mesh import ParallelMesh, all_reduce_sum
from moetrain.parallel.strategy import DataParallelStrategy


class Runner:
    def __init__(self, model: nn.Module, module, strategy: DataParallelStrategy, mesh: ParallelMesh,
                 device: torch.device, autocast, document_mask: bool):
        self.model = model  # this rank's part of the model: balance state, parameters
        self.module = module  # what forward runs on (the model, its DDP wrapper, the DeepSpeed engine)
        self.strategy, self.mesh, self.device = strategy, mesh, device
        self.autocast = autocast  # () -> the precision's autocast context
        self.document_mask = document_mask
        self._balance_scale: float | None = None

    # ------------------------------------------------------------------------------------------- interface
    def forward_backward(self, micro_batches, n_tokens: torch.Tensor, mtp_lambda: float,
                         global_batch: int) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, batch):
        """Forward only: the batch's LMOutput where the loss is computed (every rank, or the last stage's)."""
        raise NotImplementedError

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Finish the step's gradient reductions and clip them; the global norm before clipping (0-dim, device)."""
        self.strategy.finish_gradients(self.model)
        return self.strategy.clip_grad_norm(self.model, max_norm)

    def weights_changed(self, verify: bool = False) -> None:
        """After the weights were initialised, loaded or stepped (a pipeline's tied copies follow)."""

    def set_training(self, mode: bool) -> None:
        self.model.train(mode)

    def describe(self) -> str:
        return ""

    def record(self) -> dict:
        """What a metrics record adds for this runner."""
        return {}

    def report(self, micro_batches: int) -> str | None:
        """A line for train.log at the end of the run."""
        return None

    # --------------------------------------------------------------------------------------------- shared
    def _set_balance_loss_scale(self, micro_batch: int, global_batch: int) -> None:
        """The balance loss's weight in backward; pushed to the MoE layers only when it changes (a batch ramp)."""
        scale = micro_batch / global_batch * self.strategy.loss_scale
        if scale != self._balance_scale:
            for m in self.model.modules():
                if isinstance(m, MoE):
                    m.balance_loss_scale = scale
            self._balance_scale = scale

    def _balance_sum(self) -> torch.Tensor:
        """The balance losses of the forwards since the last call, summed over this rank's layers."""
        return sum(pop_balance_loss(self.model).values(), torch.zeros((), device=self.device))


def _mtp_mean(out) -> torch.Tensor:
    return torch.stack(out.mtp_loss_sums).mean() if out.mtp_loss_sums else torch.zeros((), device=out.lm_loss_sum.device)


class LocalRunner(Runner):
    """The whole model on this rank (data and expert parallelism inside the strategy and the dispatcher)."""

    def forward_backward(self, micro_batches, n_tokens, mtp_lambda, global_batch):
        self._set_balance_loss_scale(micro_batches[0].tokens.shape[0], global_batch)
        sums = torch.zeros(3, device=self.device)  # lm, mtp, balance
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last else self.strategy.accumulating(self.module):
                with self.autocast():
                    out = self._forward(mb)
                    loss = out.loss(n_tokens, mtp_lambda)
                self.strategy.backward(loss)
            with torch.no_grad():
                balance = self._balance_sum() * mb.tokens.shape[0] / global_batch  # this micro-batch's, per layer
                sums += torch.stack([out.lm_loss_sum.detach(), _mtp_mean(out).detach(), balance])
        return sums

    @torch.no_grad()
    def evaluate(self, batch):
        with self.autocast():
            return self._forward(batch)

    def _forward(self, batch):
        if self.document_mask:
            return self.module(batch.tokens, batch.labels, *batch.document_positions())
        return self.module(batch.tokens, batch.labels)


class PipelineRunner(Runner):
    """This rank's pipeline stages (moetrain.parallel.pipeline) under the schedule; the loss on the last stage (in
    its forward when chunked: the stages then get the labels)."""

    def __init__(self, pipeline, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pipeline = pipeline

    def forward_backward(self, micro_batches, n_tokens, mtp_lambda, global_batch):
        self._set_balance_loss_scale(micro_batches[0].tokens.shape[0], global_batch)
        sums = torch.zeros(3, device=self.device)
        chunked = self.pipeline.chunked_loss

        def loss_fn(outputs, labels_BT):  # on the last stage, per micro-batch
            out = stage_lm_output(outputs, labels_BT, chunked)
            if not is_recomputing():  # not the schedule's shape inference
                sums[:2] += torch.stack([out.lm_loss_sum.detach(), _mtp_mean(out).detach()])
            return out.loss(n_tokens, mtp_lambda)

        tokens = torch.cat([mb.tokens for mb in micro_batches])
        labels = torch.cat([mb.labels for mb in micro_batches])
        with self.autocast():
            self.pipeline.step(tokens, labels, len(micro_batches), loss_fn,
                               **self._stage_kwargs(micro_batches, tokens, labels))
        # Every micro-batch's balance losses, per layer of this rank's stages.
        sums[2] = self._balance_sum() * micro_batches[0].tokens.shape[0] / global_batch
        return sums

    @torch.no_grad()
    def evaluate(self, batch):
        with self.autocast():
            outputs = self.pipeline.forward_only(batch.tokens,
                                                 **self._stage_kwargs([batch], batch.tokens, batch.labels))
            return None if outputs is None else stage_lm_output(outputs, batch.labels, self.pipeline.chunked_loss)

    def _stage_kwargs(self, batches, tokens_BT, labels_BT) -> dict:
        """What every stage gets besides its input: the tokens (MTP's embeddings), the document masks, and the
        labels when the last stage computes the chunked loss in its forward."""
        kwargs = {"tokens_BT": tokens_BT}
        if self.pipeline.chunked_loss:
            kwargs["labels_BT"] = labels_BT
        if self.document_mask:
            positions = [b.document_positions() for b in batches]
            kwargs.update(doc_ids_BT=torch.cat([d for d, _ in positions]),
                          position_ids_BT=torch.cat([p for _, p in positions]))
        return kwargs

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        self.strategy.finish_gradients(self.model)
        self.pipeline.tie_embedding_grads()
        return self.strategy.clip_grad_norm(self.model, max_norm, self.pipeline.norm_excluded())

    def weights_changed(self, verify: bool = False) -> None:
        self.pipeline.after_step()  # a V-shaped rank's copy of the embedding takes the new values
        if verify:
            self.pipeline.check_tied()

    def set_training(self, mode: bool) -> None:
        for module in [self.model, *self.pipeline.stages]:
            module.train(mode)

    def describe(self) -> str:
        p = self.pipeline
        return (f" x {self.mesh.pp} pipeline ranks ({p.spec.name}, stages of blocks "
                f"{[[ids[0], ids[-1]] if len(ids) > 1 else ids for ids in p.layout]})")

    def record(self) -> dict:
        return {"pipeline_bubble_per_rank": [round(b, 4) for b in self._bubble_per_rank(self.pipeline.pop_bubble())]}

    def report(self, micro_batches: int) -> str:
        """The measured idle fraction of every pipeline rank over the run, beside the schedule's formula."""
        p, pp = self.pipeline, self.mesh.pp
        measured = self._bubble_per_rank(p.run_bubble())
        value, formula = p.spec.bubble_formula(pp, micro_batches, p.n_stages // pp)
        expected = f"{formula} = {value:.3f}" if value is not None else formula
        return (f"pipeline: {p.spec.name}, pp {pp}, {micro_batches} micro-batches: measured bubble per rank "
                f"{', '.join(f'{b:.3f}' for b in measured)} (schedule's formula: {expected})")

    def _bubble_per_rank(self, mine: float) -> list[float]:
        """Each pipeline rank's idle fraction, averaged over the data-parallel replicas."""
        t = torch.zeros(self.mesh.pp, device=self.device)
        t[self.mesh.pp_rank] = mine / self.mesh.dp
        return all_reduce_sum(all_reduce_sum(t, self.mesh.dp_group), self.mesh.pp_group).tolist()
