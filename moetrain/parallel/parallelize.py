"""One place that turns a job's config into this rank's parallelised, initialised model and its strategy.

Order on the meta model (nothing is allocated until every plan is applied): recomputation (flags on blocks and
norms), precision (FP8 modules swapped in, names and shapes kept), pipeline (this rank's stages; the layers it
does not own are dropped before anything else sees them), expert parallelism (experts sharded over ``ep``,
all-to-all dispatchers), data parallelism (the strategy's sharding). Then materialise, initialise by global
parameter name (the same initial weights for every layout), tie the pipeline's embedding copy, compile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moetrain.model import build_model
from moetrain.parallel.init import init_weights
from moetrain.parallel.mesh import ParallelMesh
from moetrain.parallel.recompute import apply_recompute
from moetrain.parallel.strategy import DataParallelStrategy, DDPStrategy, FSDPStrategy


def build_strategy(job, mesh: ParallelMesh, compute_dtype: torch.dtype, device: torch.device) -> DataParallelStrategy:
    """``parallel.dp_strategy``'s strategy. On GPU, FSDP gathers parameters in the compute dtype (fp32 masters,
    fp32 gradient reduction); on CPU autocast alone casts."""
    if job.parallel.dp_strategy == "deepspeed":
        from moetrain.parallel.zero import DeepSpeedStrategy, deepspeed_config

        return DeepSpeedStrategy(mesh, deepspeed_config(
            job.train.micro_batch_size, job.train.grad_accum_steps, job.optim.grad_clip, job.parallel.zero_stage,
            job.parallel.offload_optimizer, compute_dtype == torch.bfloat16))
    param_dtype = compute_dtype if device.type == "cuda" else torch.float32
    return {"fsdp": FSDPStrategy, "ddp": DDPStrategy}[job.parallel.dp_strategy](mesh, param_dtype)


@dataclass
class Parallelized:
    model: nn.Module  # this rank's part of the model (all of it without pp): state dicts, optimizer, balance state
    pipeline: object | None  # pp > 1: moetrain.parallel.pipeline.Pipeline, this rank's stages and schedule
    n_params: int  # of the whole model


def parallelize(job, mesh: ParallelMesh, precision, strategy: DataParallelStrategy, device: torch.device,
                log) -> Parallelized:
    model = build_model(job.model, "meta")
    n_params = sum(p.numel() for p in model.parameters())
    apply_recompute(model, job.train.recompute, precision.checkpoint_fn())
    model.loss_chunk_tokens = job.train.loss_chunk_tokens
    precision.convert(model, log)  # FP8 modules keep every parameter's name and shape
    pipeline, stages = None, None
    if mesh.pp > 1:
        model, pipeline = _pipeline(job, mesh, model, device)
        stages = pipeline.stages
    if mesh.ep > 1:
        from moetrain.parallel.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, mesh.device_mesh["ep"], job.parallel.capacity_factor)
    strategy.parallelize(model, stages)
    model.to_empty(device=device)
    for stage in stages or []:  # a V-shaped rank's copy of the embedding is in a stage only
        stage.to_empty(device=device)
    init_weights(model, job.train.seed)
    if pipeline is not None:
        for stage in stages:
            stage.freqs_cis = model.freqs_cis
    if job.train.compile:
        for block in list(model.layers.values()) + [m.block for m in model.mtp.values()]:
            block.compile()
    return Parallelized(model.train(), pipeline, n_params)


def _pipeline(job, mesh: ParallelMesh, model: nn.Module, device: torch.device):
    from moetrain.parallel.pipeline import Pipeline, split_stages
    from moetrain.parallel.pipeline_layout import chunks_per_rank, resolve_layout, schedule_spec, stages_of_rank

    par = job.parallel
    spec = schedule_spec(par.pp_schedule)
    n_stages = mesh.pp * chunks_per_rank(spec, par.pp_chunks)
    layout = resolve_layout(job.model, n_stages, par.pp_layout, job.train.seq_len)
    stage_ids = stages_of_rank(mesh.pp_rank, mesh.pp, n_stages, spec.v_shaped)
    model, stages = split_stages(model, layout, stage_ids)
    for stage in stages:
        stage.train()
    return model, Pipeline(spec, layout, stage_ids, stages, mesh, device, job.train.recompute != "none")
