"""Pipeline parallelism: this rank's stages of the model, run by a ``torch.distributed.pipelining`` schedule.

:func:`split_stages` cuts the (meta) model: every stage is a :class:`Transformer` holding its blocks and ends
(shared modules, so parameter names stay global), and ``part`` holds everything this rank owns under the same
names, for the optimizer, state dicts, initialisation and the balance state. The loss is
:func:`moetrain.model.stage_lm_output` applied to the last stage's outputs (the heads' logits, or with
``train.loss_chunk_tokens`` the loss sums that stage computed in its forward from the labels it gets as a keyword),
normalised by the global target-token count; the schedule's own gradient scaling is off (moetrain's loss is
already a global sum).

MTP on the last stage needs ``Emb(t_{i+k})``: the last stage keeps a tied copy of the embedding. Its gradient
and the first stage's are summed before the optimizer step (:meth:`Pipeline.tie_embedding_grads`) and both take
the same update: on looped schedules the copy lives on the last pp rank (in its optimizer, so both ranks step it
identically); on V-shaped ones the first and last stage share rank 0, and the copy, outside the optimizer,
takes the first stage's values after each step. :meth:`Pipeline.check_tied` verifies that they are equal.

Bubble: each stage times its forward and backward chunks; the idle fraction of a rank is 1 - busy / the wall
time of the schedule step.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage

from moetrain._compat import PIPELINE_SHAPE_INFERENCE, require_methods
from moetrain.model.layers import replaying
from moetrain.model.transformer import Transformer
from moetrain.parallel.mesh import ParallelMesh, local_tensor
from moetrain.parallel.pipeline_layout import ScheduleSpec, stage_ranks


def split_stages(model: Transformer, layout: list[list[int]], stage_ids: list[int]) -> tuple[Transformer,
                                                                                            list[Transformer]]:
    """(part, stages): ``model`` pruned in place to what the stages ``stage_ids`` of ``layout`` own, and one stage
    module per id (sharing part's modules; a V-shaped rank's last stage has its own copy of the embedding)."""
    n_stages, mtp = len(layout), bool(model.cfg.n_mtp_layers)
    owns_first, owns_last = 0 in stage_ids, n_stages - 1 in stage_ids
    stages = []
    for s in stage_ids:
        first, last = s == 0, s == n_stages - 1
        embed = None
        if first or (last and mtp):
            embed = copy.deepcopy(model.embed) if last and owns_first and not first else model.embed
        stages.append(model.stage(layout[s], first, last, embed))
    owned = {i for s in stage_ids for i in layout[s]}
    for i in [i for i in model.layers if int(i) not in owned]:
        del model.layers[i]
    if not (owns_first or (owns_last and mtp)):
        del model.embed
    if not owns_last:
        del model.norm, model.head
        model.mtp = nn.ModuleDict()
    model.is_first, model.is_last = owns_first, owns_last
    return model, stages


require_methods(PipelineStage, PIPELINE_SHAPE_INFERENCE)


class _TimedStage(PipelineStage):
    """A PipelineStage that times its forward and backward computations (:meth:`busy_s`), and whose shape
    inference (a forward and loss on placeholder tensors, at a schedule's first step) leaves no counts behind.

    On CPU the host clock times the work; on CUDA, events on the stream around each chunk (kernels run after the
    host returns), read once per step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._host_s = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def _timed(self, fn, *args, **kwargs):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                return fn(*args, **kwargs)
            finally:
                end.record()
                self._events.append((start, end))
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self._host_s += time.perf_counter() - t0

    def pop_busy_s(self) -> float:
        """Seconds of computation since the last call (synchronises with the device on CUDA)."""
        if self._events:
            self._events[-1][1].synchronize()
            self._host_s += sum(s.elapsed_time(e) for s, e in self._events) / 1e3
            self._events.clear()
        busy, self._host_s = self._host_s, 0.0
        return busy

    # NOTE: torch 2.13 runs the stage module and the loss on uninitialised tensors to learn the shapes; without
    # this the routers would count those tokens and the balance-loss metric would take their (garbage) values.
    def _prepare_forward_infra(self, *args, **kwargs):
        with replaying():
            return super()._prepare_forward_infra(*args, **kwargs)

    def _prepare_backward_infra(self, *args, **kwargs):
        with replaying():
            return super()._prepare_backward_infra(*args, **kwargs)

    def forward_one_chunk(self, *args, **kwargs):
        return self._timed(super().forward_one_chunk, *args, **kwargs)

    def backward_one_chunk(self, *args, **kwargs):
        return self._timed(super().backward_one_chunk, *args, **kwargs)

    def backward_weight_one_chunk(self, *args, **kwargs):
        return self._timed(super().backward_weight_one_chunk, *args, **kwargs)


class Pipeline:
    """This rank's stages, the schedule running them (remade when the micro-batch count changes) and the tied
    embedding."""

    def __init__(self, spec: ScheduleSpec, layout: list[list[int]], stage_ids: list[int], stages: list[Transformer],
                 mesh: ParallelMesh, device: torch.device, recompute: bool = False):
        self.spec, self.layout, self.stage_ids, self.stages = spec, layout, stage_ids, stages
        self.recompute = recompute  # activation recomputation is on (train.recompute)
        self.mesh, self.device = mesh, device
        self.n_stages = len(layout)
        self.ranks = stage_ranks(mesh.pp, self.n_stages, spec.v_shaped)
        # The last stage computes the chunked loss in its forward: every stage gets the labels (labels_BT).
        self.chunked_loss = stages[0].loss_chunk_tokens > 0
        self._schedule_of: tuple[int, object, list[_TimedStage]] | None = None  # (micro-batches, schedule, stages)
        self.busy_s = self.wall_s = 0.0  # since the last pop_bubble
        self.run_busy_s = self.run_wall_s = 0.0
        self.embed_group = _embedding_group(mesh, self.ranks) if stages[0].cfg.n_mtp_layers else None

    # --------------------------------------------------------------------------------------- schedules
    def _schedule(self, n_micro: int, loss_fn):
        """The schedule for ``n_micro`` micro-batches; a new one (and new stages, whose receive buffers are sized
        per micro-batch) only when the count changes, as the batch-size ramp does."""
        if self._schedule_of is None or self._schedule_of[0] != n_micro:
            from torch.distributed import pipelining

            timed = [_TimedStage(stage, s, self.n_stages, self.device, group=self.mesh.pp_group,
                                 dw_builder=_full_backward if self._whole_backward(stage) else None)
                     for s, stage in zip(self.stage_ids, self.stages)]
            cls = getattr(pipelining, f"Schedule{self.spec.name}")
            self._schedule_of = None  # the old stages (and their receive buffers) are released
            # scale_grads=False: the loss is already this micro-batch's share of the global mean.
            schedule = cls(timed[0] if len(timed) == 1 and not _multi(cls) else timed, n_micro, loss_fn=self._loss,
                           scale_grads=False)
            self._schedule_of = (n_micro, schedule, timed)
        _, schedule, timed = self._schedule_of
        self._loss_fn = loss_fn
        return schedule, timed

    def _whole_backward(self, stage: Transformer) -> bool:
        """Whether a zero-bubble schedule must run this stage's weight gradients with its input gradients.

        NOTE: torch 2.13's split backward (stage_backward_input / _weight) fails or double-counts when one weight
        is used at several points of one autograd path (pytorch/pytorch#180952): the shared head of the MTP
        depths on the last stage, and recomputed blocks (their forward re-runs inside the input pass). The chunked
        loss (moetrain.model.loss) makes h's and the head's gradients from one recomputation of each block of
        logits: split, the input pass and the weight pass would each run all of it (correct, at twice the cost).
        """
        return (stage.is_last and (bool(stage.cfg.n_mtp_layers) or self.chunked_loss)) or self.recompute

    def _loss(self, outputs, labels_BT):
        # NOTE: torch's shape inference passes a one-output stage's output bare, its runtime as a 1-tuple.
        return self._loss_fn((outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs), labels_BT)

    def step(self, inputs_BT: torch.Tensor, targets_BT: torch.Tensor, n_micro: int, loss_fn, **kwargs) -> None:
        """Forward and backward of ``n_micro`` micro-batches (the rows of the token ids inputs_BT, split evenly);
        ``loss_fn(outputs, labels)`` runs on the last stage per micro-batch, on the tuple of its outputs; ``kwargs``
        (document ids, positions, the tokens for MTP, the labels of the chunked loss) reach every stage."""
        first_use = self._schedule_of is None or self._schedule_of[0] != n_micro
        schedule, timed = self._schedule(n_micro, loss_fn)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the wall clock starts with the device idle
        t0 = time.perf_counter()
        args = (inputs_BT,) if 0 in self.stage_ids else ()
        target = targets_BT if self.n_stages - 1 in self.stage_ids else None
        schedule.step(*args, target=target, return_outputs=False, **kwargs)
        busy = sum(t.pop_busy_s() for t in timed)  # on CUDA: waits for the step's last kernels
        wall = time.perf_counter() - t0
        self.wall_s, self.busy_s = self.wall_s + wall, self.busy_s + busy
        if not first_use:  # the first step of a schedule also infers shapes and connects the stages
            self.run_wall_s, self.run_busy_s = self.run_wall_s + wall, self.run_busy_s + busy

    def pop_bubble(self) -> float:
        """This rank's idle fraction of the schedule steps since the last call."""
        idle = _idle(self.busy_s, self.wall_s)
        self.busy_s = self.wall_s = 0.0
        return idle

    def run_bubble(self) -> float:
        """This rank's idle fraction over the run (each schedule's first step left out)."""
        return _idle(self.run_busy_s, self.run_wall_s)

    # --------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def forward_only(self, inputs_BT: torch.Tensor, **kwargs) -> tuple[torch.Tensor, ...] | None:
        """One batch through every stage in order, forward only; the last stage's rank gets its outputs."""
        group, me = self.mesh.pp_group, self.mesh.pp_rank
        h, outputs = None, None
        for s in range(self.n_stages):
            if self.ranks[s] != me:
                continue
            if s == 0:
                h = inputs_BT
            elif self.ranks[s - 1] != me:
                h = _recv(inputs_BT.shape + (self.stages[0].cfg.dim,), self.ranks[s - 1], group, self.device)
            out = self.stages[self.stage_ids.index(s)](h, **kwargs)
            if s == self.n_stages - 1:
                outputs = out
            elif self.ranks[s + 1] != me:
                _send(out, self.ranks[s + 1], group)
            else:
                h = out
        return outputs

    # --------------------------------------------------------------------------------------- tied embedding
    def _embeddings(self) -> tuple[nn.Parameter | None, nn.Parameter | None]:
        """(the first stage's embedding, the last stage's copy), each None where this rank has no such stage (and the
        copy None without MTP, whose last stage holds no embedding)."""
        first = self.stages[self.stage_ids.index(0)].embed.weight if 0 in self.stage_ids else None
        last, mtp = self.n_stages - 1, bool(self.stages[0].cfg.n_mtp_layers)
        copy_ = self.stages[self.stage_ids.index(last)].embed.weight if mtp and last in self.stage_ids else None
        return first, copy_

    @torch.no_grad()
    def tie_embedding_grads(self) -> None:
        """Sum the gradients of the embedding and its copy (before clipping and the step)."""
        if not self.stages[0].cfg.n_mtp_layers:
            return
        first, copy_ = self._embeddings()
        if first is not None and copy_ is not None:  # V-shaped: both here
            if copy_.grad is not None:
                local_tensor(first.grad).add_(local_tensor(copy_.grad))
            copy_.grad = None  # outside the optimizer: it takes first's values after the step
        elif first is not None or copy_ is not None:
            g = (first if first is not None else copy_).grad
            dist.all_reduce(local_tensor(g), group=self.embed_group)

    @torch.no_grad()
    def after_step(self) -> None:
        """V-shaped: the copy takes the embedding's updated values."""
        first, copy_ = self._embeddings()
        if first is not None and copy_ is not None and first is not copy_:
            local_tensor(copy_).copy_(local_tensor(first))

    def norm_excluded(self) -> set[int]:
        """ids of parameters the gradient norm must not count (the embedding copy counts once, on its first stage)."""
        first, copy_ = self._embeddings()
        return {id(copy_)} if copy_ is not None and copy_ is not first else set()

    @torch.no_grad()
    def check_tied(self) -> None:
        """Raise if the embedding and the last stage's copy differ (compares float64 sums of every shard)."""
        if not self.stages[0].cfg.n_mtp_layers:
            return
        first, copy_ = self._embeddings()
        if first is not None and copy_ is not None:
            a, b = local_tensor(first).double(), local_tensor(copy_).double()
            if not torch.equal(a, b):
                raise RuntimeError("pipeline: the last stage's copy of the embedding differs from the embedding")
            return
        if first is None and copy_ is None:
            return
        w = local_tensor(first if first is not None else copy_).double()
        mine = torch.stack([w.sum(), w.square().sum()])
        both = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(both, mine, group=self.embed_group)
        if not torch.equal(both[0], both[1]):
            raise RuntimeError("pipeline: the last stage's copy of the embedding differs from the first stage's "
                               f"(sums {both[0].tolist()} vs {both[1].tolist()})")


def _full_backward():
    """A stage's weight pass when its input pass already computed every gradient."""
    return lambda: None


def _idle(busy_s: float, wall_s: float) -> float:
    return max(1.0 - busy_s / wall_s, 0.0) if wall_s else 0.0


def _multi(cls) -> bool:
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti

    return issubclass(cls, PipelineScheduleMulti)


def _embedding_group(mesh: ParallelMesh, ranks: list[int]):
    """The group of the global ranks holding the first stage and the last (tied copies of the embedding), one per
    data-parallel coordinate; None when both stages are on one rank (V-shaped). Every rank creates every group."""
    first, last = ranks[0], ranks[-1]
    if first == last:
        return None
    mine = None
    for dp_rank in range(mesh.dp):
        group = dist.new_group([first * mesh.dp + dp_rank, last * mesh.dp + dp_rank])
        if dp_rank == mesh.dp_rank:
            mine = group
    return mine


_WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _send(t: torch.Tensor, pp_rank: int, group) -> None:
    dist.send(torch.tensor([_WIRE_DTYPES.index(t.dtype)], device=t.device), group=group, group_dst=pp_rank)
    dist.send(t.contiguous(), group=group, group_dst=pp_rank)


def _recv(shape: tuple[int, ...], pp_rank: int, group, device) -> torch.Tensor:
    code = torch.empty(1, dtype=torch.int64, device=device)
    dist.recv(code, group=group, group_src=pp_rank)
    buf = torch.empty(shape, dtype=_WIRE_DTYPES[int(code)], device=device)
    dist.recv(buf, group=group, group_src=pp_rank)
    return buf
