"""The checks of a composed job that span config groups, each run once, before any process group starts; every
refusal names the override to change (:class:`ConfigError`).

Order: the layout against the world size (:func:`check_layout`, which everything after relies on), every group's
own values, the pipeline, the FP8 combinations.
"""

from __future__ import annotations

import math
from dataclasses import fields, is_dataclass

from moetrain.config.schema import DP_STRATEGIES, ZERO_STAGES, JobConfig, ModelConfig, ParallelConfig, TrainConfig
from moetrain.model.config import require

# Pipeline schedules that split each backward into an input pass and a weight pass.
SPLIT_BACKWARD_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")


def validate_job(job: JobConfig, world_size: int = 1) -> JobConfig:
    """Every check of ``job`` for ``world_size`` ranks; derives train.grad_accum_steps. Returns ``job``."""
    _require_finite(job, "")
    check_layout(job.parallel, world_size, job.model.moe.n_routed_experts)
    check_supported(job.parallel)
    job.model.validate("model")
    job.data.validate()
    job.precision.validate()
    job.optim.validate()
    job.train.validate(job.model, job.parallel.data_parallel_size(world_size))
    check_pipeline(job.parallel, job.model, job.train, world_size)
    _check_fp8_combinations(job)
    require(not job.train.val_interval or job.data.val_fraction > 0, "train.val_interval",
            f"validation every {job.train.val_interval} steps needs held-out data, but data.val_fraction=0; "
            "set data.val_fraction > 0 or train.val_interval=0")
    job.checkpoint.validate()
    job.logging.validate()
    job.plan.validate()
    return job


def check_layout(parallel: ParallelConfig, world_size: int, n_routed_experts: int | None = None,
                 prefix: str = "parallel") -> None:
    """Refuse a layout that no trainer could run, with the arithmetic (needs no process group)."""
    require(parallel.pp >= 1, f"{prefix}.pp", f"must be >= 1, got {parallel.pp}")
    require(parallel.ep >= 1, f"{prefix}.ep", f"must be >= 1, got {parallel.ep}")
    require(parallel.dp == -1 or parallel.dp >= 1, f"{prefix}.dp",
            f"must be >= 1 or -1 (all ranks / pp), got {parallel.dp}")
    if parallel.dp == -1:
        require(world_size % parallel.pp == 0, f"{prefix}.pp",
                 f"the world size {world_size} is not divisible by pp={parallel.pp} "
                 f"({world_size} % {parallel.pp} = {world_size % parallel.pp})")
    else:
        require(parallel.dp * parallel.pp == world_size, f"{prefix}.dp",
                 f"dp * pp = {parallel.dp} * {parallel.pp} = {parallel.dp * parallel.pp} must equal the world size "
                 f"{world_size} "
                 "(or set parallel.dp=-1)")
    dp = parallel.data_parallel_size(world_size)
    require(dp % parallel.ep == 0, f"{prefix}.ep",
             f"ep={parallel.ep} does not divide the data-parallel size dp={dp} "
             f"(= world size {world_size} / pp {parallel.pp})")
    if n_routed_experts is not None:
        require(n_routed_experts % parallel.ep == 0, "model.moe.n_routed_experts",
                 f"{n_routed_experts} experts cannot be split over ep={parallel.ep} ranks "
                 f"({n_routed_experts} % {parallel.ep} = {n_routed_experts % parallel.ep})")
    _check_strategy(parallel, prefix)


def _check_strategy(parallel: ParallelConfig, prefix: str) -> None:
    require(parallel.dp_strategy in DP_STRATEGIES, f"{prefix}.dp_strategy",
             f"must be one of {', '.join(DP_STRATEGIES)}, got {parallel.dp_strategy!r}")
    require(parallel.zero_stage in ZERO_STAGES, f"{prefix}.zero_stage",
             f"must be 1 or 2, got {parallel.zero_stage} (for ZeRO-3 sharding use parallel.dp_strategy=fsdp)")
    require(parallel.capacity_factor is None or parallel.capacity_factor > 0, f"{prefix}.capacity_factor",
             f"must be > 0, or null for dropless routing, got {parallel.capacity_factor}")
    require(not parallel.offload_optimizer or parallel.dp_strategy == "deepspeed", f"{prefix}.offload_optimizer",
             f"only dp_strategy=deepspeed offloads the optimizer, got dp_strategy={parallel.dp_strategy}")
    # NOTE: DeepSpeed pipelines only its own PipelineModule engine; moetrain's stages run
    # torch.distributed.pipelining schedules, which a DeepSpeed ZeRO engine cannot drive.
    require(parallel.dp_strategy != "deepspeed" or parallel.pp == 1, f"{prefix}.dp_strategy",
             f"deepspeed cannot run with pp={parallel.pp}: DeepSpeed's engine does not drive "
             "torch.distributed.pipelining stages; use parallel.dp_strategy=fsdp or parallel.pp=1")


def check_supported(parallel: ParallelConfig, prefix: str = "parallel") -> None:
    """Refuse what the trainer does not implement yet (valid layouts the mesh can already be built for)."""
    require(parallel.dp_strategy != "ddp" or parallel.pp == 1, f"{prefix}.dp_strategy",
             f"ddp is not combined with pipeline stages (pp={parallel.pp}); use parallel.dp_strategy=fsdp")


def check_pipeline(parallel: ParallelConfig, model: ModelConfig, train: TrainConfig, world_size: int) -> None:
    """The schedule, stages per rank, layout and micro-batch count, checked before any process starts."""
    from moetrain.parallel.pipeline_layout import chunks_per_rank, resolve_layout, schedule_spec

    spec = schedule_spec(parallel.pp_schedule)
    if parallel.pp == 1:
        require(parallel.pp_layout is None, "parallel.pp_layout", "is for pipeline stages; it needs parallel.pp > 1")
        return
    chunks = chunks_per_rank(spec, parallel.pp_chunks)
    resolve_layout(model, parallel.pp * chunks, parallel.pp_layout, train.seq_len)
    unit = train.micro_batch_size * parallel.data_parallel_size(world_size)
    spec.check_microbatches(train.global_batch_size // unit, parallel.pp, chunks, "train.global_batch_size")
    if train.batch_ramp_start:  # the ramp steps through every multiple of micro_batch_size * dp
        for m in range(train.batch_ramp_start // unit, train.global_batch_size // unit):
            spec.check_microbatches(m, parallel.pp, chunks, "train.batch_ramp_start")
    require(not (train.compile and spec.name in SPLIT_BACKWARD_SCHEDULES), "train.compile",
            f"{spec.name} splits backward into input and weight passes, which torch does not run through "
            "compiled blocks; use train.compile=false or another parallel.pp_schedule")


def _check_fp8_combinations(job: JobConfig) -> None:
    """What the Transformer Engine provider is not (yet) run with: refused before launch, with the reason."""
    if job.precision.dtype != "fp8" or job.precision.fp8.provider != "te":
        return
    # Recomputation runs through TE's own checkpoint (Precision.checkpoint_fn), which re-runs the forward inside
    # the recipe's autocast with the forward's scaling state. NOTE: its non-reentrant form hands each recomputed
    # activation out once, and a schedule that splits backward into input and weight passes asks twice.
    split_backward = job.parallel.pp > 1 and job.parallel.pp_schedule in SPLIT_BACKWARD_SCHEDULES
    require(job.train.recompute == "none" or not split_backward, "train.recompute",
            f"{job.train.recompute} recomputation with precision.fp8.provider=te is not run with "
            f"{job.parallel.pp_schedule}, whose split backward recomputes each block twice (Transformer Engine's "
            "checkpoint recomputes once); use train.recompute=none or another parallel.pp_schedule")
    # TE's delayed scaling must see each module once per autocast region; a pipeline step runs many.
    require(job.precision.fp8.recipe != "delayed" or job.parallel.pp == 1, "precision.fp8.recipe",
            f"delayed scaling is not run with pipeline stages (parallel.pp={job.parallel.pp}); use blockwise or "
            "current")


def _require_finite(node, prefix: str) -> None:
    """No nan or inf anywhere in the config (``optim.lr=inf`` would train garbage without a word)."""
    for f in fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if is_dataclass(value):
            _require_finite(value, key + ".")
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            require(not isinstance(v, float) or math.isfinite(v), key, f"must be a finite number, got {value}")
