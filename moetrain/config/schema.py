"""The job config's schema: one dataclass per Hydra group (conf/ mirrors it), each checking its own values.

What spans groups (the layout against the world size, the pipeline, batch arithmetic, FP8 combinations) is
checked once, in :mod:`moetrain.config.checks`; composition and resolvers are :mod:`moetrain.config.hydra`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from moetrain.model.config import ModelConfig, require


@dataclass
class RunConfig:
    # The same for the same command (see _run_name): running it again, on any rank, after a Slurm requeue or a
    # resubmission, continues the run; MOETRAIN_RUN_ID names it explicitly.
    dir: str = "runs/${mt.run_name:}"


@dataclass
class DataConfig:
    kind: str = "demo"  # demo (shipped English text, byte tokens) | synthetic (random tokens) | shards
    paths: list[str] = field(default_factory=list)  # kind=shards: prepared dataset dirs or fsspec URLs
    weights: list[float] = field(default_factory=list)  # blend weights, one per path (default: equal)
    seed: int = 1234
    val_fraction: float = 0.01  # share of each dataset's samples held out for validation (the tail)
    demo_bytes: int = 1_000_000  # size of the demo corpus
    cache_dir: Optional[str] = None  # prepared demo data and copies of remote shards; default ~/.cache/moetrain
    verify_checksums: bool = True  # check each shard's sha256 against manifest.json when it is opened
    prefetch: bool = True  # read the next step's batches on a background thread
    document_mask: bool = False  # attend only within each packed document, RoPE positions restart per document

    def validate(self, prefix: str = "data") -> None:
        require(self.kind in ("demo", "synthetic", "shards"), f"{prefix}.kind",
                 f"must be demo, synthetic or shards, got {self.kind!r}")
        if self.kind == "shards":
            require(len(self.paths) > 0, f"{prefix}.paths", "data=shards needs at least one dataset directory")
        require(not self.weights or len(self.weights) == len(self.paths), f"{prefix}.weights",
                 f"need one weight per path ({len(self.paths)}), got {len(self.weights)}")
        require(all(w > 0 for w in self.weights), f"{prefix}.weights", "must be positive")
        require(0 <= self.val_fraction < 0.5, f"{prefix}.val_fraction", "must be in [0, 0.5)")
        require(self.demo_bytes >= 10_000, f"{prefix}.demo_bytes", "must be at least 10000")


DP_STRATEGIES = ("fsdp", "deepspeed", "ddp")
ZERO_STAGES = (1, 2)  # ZeRO-3 shards parameters, which is what dp_strategy=fsdp does


@dataclass
class ParallelConfig:
    """The layout of the job: world = pp x dp, and the dp data ranks = edp x ep (ep innermost, contiguous ranks);
    checked against the world size by :func:`moetrain.config.checks.check_layout`."""

    dp: int = -1  # data-parallel ranks (each sees its own micro-batches); -1 = world size / pp
    pp: int = 1  # pipeline stages; the outermost mesh dimension
    ep: int = 1  # expert-parallel ranks: each dp rank holds n_routed_experts / ep experts; must divide dp
    dp_strategy: str = "fsdp"  # fsdp (FSDP2's fully_shard) | deepspeed (ZeRO, no pp) | ddp
    zero_stage: int = 1  # dp_strategy=deepspeed: 1 shards optimizer states, 2 also gradients
    offload_optimizer: bool = False  # dp_strategy=deepspeed: keep optimizer states (and step) on the CPU
    # ep > 1: None is dropless; c keeps at most ceil(c * T * K / E) copies per expert from each rank (the
    # earliest tokens) and drops the rest, reported as dropped_fraction in metrics.jsonl.
    capacity_factor: Optional[float] = None
    # pp > 1: GPipe | 1F1B | Interleaved1F1B | ZBVZeroBubble | DualPipeV (torch.distributed.pipelining)
    pp_schedule: str = "1F1B"
    pp_chunks: int = 0  # stages per pp rank; 0 = the schedule's (2 for Interleaved1F1B and the V-shaped ones)
    # Blocks per stage ([3, 1]) or each stage's layer ids ([[0, 1, 2], [3]]); null = balanced by estimated cost.
    pp_layout: Optional[list[Any]] = None

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.pp if self.dp == -1 else self.dp


FP8_PROVIDERS = ("te", "native")
FP8_RECIPES = ("blockwise", "current", "delayed", "mxfp8")
FP8_GEMMS = ("auto", "emulated", "scaled")


@dataclass
class FP8Config:
    """precision.dtype=fp8: which library quantises and which scaling recipe (see moetrain.precision)."""

    provider: str = "te"  # te (Transformer Engine, Hopper+) | native (torch quantisation, torch's scaled GEMMs)
    recipe: str = "blockwise"  # blockwise (DeepSeek-V3: 1x128 / 128x128) | current | delayed | mxfp8 (te only)
    pow2_scales: bool = False  # native: round every scale up to a power of two (TE's recipes choose their own)
    # native: auto (F.scaled_mm / F.scaled_grouped_mm where the device has the recipe's kernel, else emulated) |
    # emulated (dequantised operands multiplied in fp32, anywhere) | scaled (the kernels, or refuse)
    gemm: str = "auto"
    fallback: str = "none"  # none: refuse where FP8 cannot run | bf16: warn once and train in bf16

    def validate(self, prefix: str = "precision.fp8") -> None:
        require(self.provider in FP8_PROVIDERS, f"{prefix}.provider", f"must be te or native, got {self.provider!r}")
        require(self.recipe in FP8_RECIPES, f"{prefix}.recipe",
                 f"must be one of {', '.join(FP8_RECIPES)}, got {self.recipe!r}")
        require(self.provider == "te" or self.recipe in ("blockwise", "current"), f"{prefix}.recipe",
                 f"{self.recipe} scaling is Transformer Engine's; the native provider runs blockwise or current")
        require(self.fallback in ("none", "bf16"), f"{prefix}.fallback", f"must be none or bf16, got {self.fallback!r}")
        require(self.gemm in FP8_GEMMS, f"{prefix}.gemm", f"must be one of {', '.join(FP8_GEMMS)}, got {self.gemm!r}")
        require(self.provider == "native" or self.gemm == "auto", f"{prefix}.gemm",
                f"{self.gemm} chooses the native provider's GEMMs; Transformer Engine runs its own: leave it auto or "
                "set precision.fp8.provider=native")


@dataclass
class PrecisionConfig:
    # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp8 (FP8 GEMMs, bf16 elsewhere; fp32 elsewhere on CPU).
    # Master weights, optimizer states and the router stay fp32.
    dtype: str = "auto"
    fp8: FP8Config = field(default_factory=FP8Config)
    # CUDA: fp32 matmuls and convolutions in TF32 (10-bit mantissa, fp32 range). Off by default: under bf16 the
    # fp32 GEMMs left are the router gate, which DeepSeek-V3 keeps in full fp32, and native FP8's emulated GEMMs;
    # turn it on for precision=fp32 runs that trade exactness for speed.
    tf32: bool = False

    def validate(self, prefix: str = "precision") -> None:
        require(self.dtype in ("auto", "fp32", "bf16", "fp8"), f"{prefix}.dtype",
                 f"must be auto, fp32, bf16 or fp8, got {self.dtype!r}")
        self.fp8.validate(f"{prefix}.fp8")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # matrices only; norms, biases and embeddings-free vectors are not decayed
    grad_clip: float = 1.0
    schedule: str = "cosine"  # cosine: warmup, cosine to min_lr | v3: warmup, constant, cosine, constant
    warmup_steps: int = 100
    decay_start: float = 0.0  # v3: fraction of train.steps where the cosine decay starts (V3: 10T / 14.8T)
    decay_end: float = 1.0  # v3: fraction where it reaches min_lr, which then holds (V3: 14.3T / 14.8T)
    final_lr: Optional[float] = None  # v3: constant lr of the last phase (V3: 7.3e-6 for the last 167B tokens)
    final_start: float = 1.0  # v3: fraction where final_lr starts

    def validate(self, prefix: str = "optim") -> None:
        require(self.lr > 0, f"{prefix}.lr", f"must be positive, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, f"{prefix}.min_lr", "must be in [0, optim.lr]")
        require(all(0 <= b < 1 for b in self.betas), f"{prefix}.betas", "must be in [0, 1)")
        require(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
        require(self.grad_clip >= 0, f"{prefix}.grad_clip", "must be >= 0 (0 disables clipping)")
        require(self.schedule in ("cosine", "v3"), f"{prefix}.schedule", f"must be cosine or v3, got {self.schedule!r}")
        require(self.warmup_steps >= 0, f"{prefix}.warmup_steps", "must be >= 0")
        require(0 <= self.decay_start <= self.decay_end <= 1, f"{prefix}.decay_start",
                 "need 0 <= decay_start <= decay_end <= 1")
        require(self.decay_end <= self.final_start <= 1, f"{prefix}.final_start", "need decay_end <= final_start <= 1")
        require(self.final_lr is None or self.final_lr >= 0, f"{prefix}.final_lr", "must be >= 0")


@dataclass
class ProfileConfig:
    """train.profile: a torch.profiler trace of steps [a, b] on the chosen ranks, under run.dir/profile/."""

    steps: list[int] = field(default_factory=list)  # [a, b]; empty: no profiling
    ranks: list[int] = field(default_factory=lambda: [0])
    memory: bool = False  # GPU: also a CUDA memory snapshot of the same steps (torch.cuda.memory._dump_snapshot)

    def validate(self, prefix: str = "train.profile") -> None:
        require(not self.steps or (len(self.steps) == 2 and 1 <= self.steps[0] <= self.steps[1]), f"{prefix}.steps",
                f"must be [first, last] with 1 <= first <= last, or [] for none, got {self.steps}")


@dataclass
class TrainConfig:
    steps: int = 1000
    stop_at: int = -1  # end after this step (as a preemption would); schedules still follow train.steps
    seed: int = 0
    seq_len: int = 256
    global_batch_size: int = 32  # sequences per optimizer step (at the end of the ramp)
    micro_batch_size: int = 8  # sequences per forward/backward on one data-parallel rank
    # Derived when the config is checked: global_batch_size / (micro_batch_size * dp); a value given must agree.
    grad_accum_steps: Optional[int] = None
    # Batch-size ramp (V3: 3072 -> 15360 sequences over the first 469B tokens); 0 disables it.
    batch_ramp_start: int = 0
    batch_ramp_tokens: int = 0
    # Aux-loss-free balancing speed gamma (V3: 0.001), set to 0 from this fraction of train.steps on (V3: 0.966).
    bias_update_speed: float = 0.001
    bias_update_stop: float = 1.0
    # MTP loss weight lambda (V3: 0.3, then 0.1 from 10T of 14.8T tokens = 0.676).
    mtp_lambda: float = 0.3
    mtp_lambda_final: float = 0.1
    mtp_lambda_switch: float = 1.0
    recompute: str = "none"  # none | selective (norms, MLA up-projections + attention) | full (each block)
    # Tokens per chunk of the main and MTP heads' cross entropy (moetrain.model.loss): each chunk's logits are
    # computed, used and dropped, and recomputed in backward, so no [tokens, vocab] logits are ever held (at
    # V3's vocabulary in bf16 0.8 MB per token for the main head and 0.5 MB per MTP head otherwise). 0 = off: the
    # full logits, which the model's output then carries (LMOutput.logits). Under parallel.pp > 1 the last stage
    # computes it in its forward and hands the schedule the loss sums instead of the logits.
    loss_chunk_tokens: int = 0
    compile: bool = False  # torch.compile each block
    val_interval: int = 0  # steps between validation passes; 0 = never
    val_batches: int = 4
    device: str = "auto"  # auto | cpu | cuda
    # Consecutive steps with a non-finite loss or gradient norm tolerated (their updates skipped) before the run
    # stops with an error; 1 stops at the first. No checkpoint is written after a non-finite step.
    max_nonfinite_steps: int = 1
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def validate(self, model: ModelConfig, dp: int, prefix: str = "train") -> None:
        require(self.steps >= 1, f"{prefix}.steps", "must be >= 1")
        require(self.seq_len >= 2, f"{prefix}.seq_len", "must be >= 2")
        require(self.seq_len <= model.max_seq_len, f"{prefix}.seq_len",
                 f"{self.seq_len} exceeds the model's maximum model.max_seq_len={model.max_seq_len}")
        require(self.micro_batch_size >= 1, f"{prefix}.micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        require(self.global_batch_size >= 1, f"{prefix}.global_batch_size", f"must be >= 1, got {self.global_batch_size}")
        unit = self.micro_batch_size * dp
        require(self.global_batch_size % unit == 0, f"{prefix}.global_batch_size",
                 f"{self.global_batch_size} is not divisible by micro_batch_size * dp = {unit}")
        derived = self.global_batch_size // unit
        require(self.grad_accum_steps in (None, derived), f"{prefix}.grad_accum_steps",
                f"is derived: global_batch_size / (micro_batch_size * dp) = {derived}, got {self.grad_accum_steps}; "
                "leave it unset")
        self.grad_accum_steps = derived
        if self.batch_ramp_start:
            require(0 < self.batch_ramp_start <= self.global_batch_size and self.batch_ramp_start % unit == 0,
                     f"{prefix}.batch_ramp_start", f"must be in (0, global_batch_size] and divisible by {unit}")
            require(self.batch_ramp_tokens > 0, f"{prefix}.batch_ramp_tokens", "must be > 0 with a ramp")
        require(self.recompute in ("none", "selective", "full"), f"{prefix}.recompute",
                 f"must be none, selective or full, got {self.recompute!r}")
        require(self.device in ("auto", "cpu", "cuda"), f"{prefix}.device", "must be auto, cpu or cuda")
        require(type(self.loss_chunk_tokens) is int and self.loss_chunk_tokens >= 0, f"{prefix}.loss_chunk_tokens",
                f"must be an integer >= 0 (0 = off), got {self.loss_chunk_tokens!r}")
        require(self.bias_update_speed >= 0, f"{prefix}.bias_update_speed", "must be >= 0")
        require(self.mtp_lambda >= 0 and self.mtp_lambda_final >= 0, f"{prefix}.mtp_lambda", "must be >= 0")
        require(self.val_interval >= 0, f"{prefix}.val_interval", "must be >= 0")
        require(self.val_batches >= 1, f"{prefix}.val_batches", "must be >= 1")
        require(self.max_nonfinite_steps >= 1, f"{prefix}.max_nonfinite_steps", "must be >= 1")
        self.profile.validate(f"{prefix}.profile")


@dataclass
class CheckpointConfig:
    dir: str = "${run.dir}/checkpoints"
    interval: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2
    resume: str = "auto"  # auto | none | a checkpoint path (or a checkpoint.dir: its newest complete one)
    init_from_hf: Optional[str] = None  # start from Hugging Face weights when there is nothing to resume
    async_save: bool = False  # write in the background; training stalls only for the copy to host memory
    # Resume although train.seq_len, data.seed, data.val_fraction or the datasets (paths, weights, contents)
    # differ from the checkpoint's: the loader then continues at the same sample count in the new data order.
    allow_data_change: bool = False

    def validate(self, prefix: str = "checkpoint") -> None:
        require(self.interval >= 0, f"{prefix}.interval", "must be >= 0")
        require(self.keep_last >= 1, f"{prefix}.keep_last", "must be >= 1")


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "moetrain"
    entity: Optional[str] = None
    name: Optional[str] = None
    mode: str = "online"  # online | offline | disabled

    def validate(self, prefix: str = "logging.wandb") -> None:
        require(self.mode in ("online", "offline", "disabled"), f"{prefix}.mode", "must be online, offline or disabled")


@dataclass
class TensorBoardConfig:
    enabled: bool = False  # event files under run.dir/tensorboard (needs the tensorboard package)


@dataclass
class LoggingConfig:
    interval: int = 10
    console: bool = True
    jsonl: bool = True
    peak_tflops: Optional[float] = None  # per device; None = look the GPU up in moetrain.plan.PEAK_TFLOPS
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)

    def validate(self, prefix: str = "logging") -> None:
        require(self.interval >= 1, f"{prefix}.interval", "must be >= 1")
        self.wandb.validate(f"{prefix}.wandb")


@dataclass
class PlanConfig:
    """What ``moetrain plan`` assumes beyond the job's own config: the cluster, the speed, the budget."""

    gpu: str = "H100"  # a name of moetrain.plan.GPU_MEMORY_GB / PEAK_TFLOPS, or any with the two keys below
    gpu_memory_gb: float | None = None  # null = the datasheet's
    peak_tflops: float | None = None  # dense bf16; null = the datasheet's
    gpus: int | None = None  # the world size; null = parallel.dp * parallel.pp when dp is set, else 1
    reserved_gb: float = 4.0  # per GPU outside the model: CUDA context, NCCL buffers, allocator fragmentation
    # Speed, the first one set wins: a measured rate, a measured job throughput, else an assumed MFU.
    gpu_hours_per_trillion_tokens: float | None = None
    tokens_per_s: float | None = None  # of the whole job
    mfu: float = 0.4
    tokens: float | None = None  # the token budget; null = train.steps * global batch * seq_len
    extra_gpu_hours: dict[str, float] = field(default_factory=dict)  # named phases beyond pretraining
    price_per_gpu_hour: float = 2.0  # dollars

    def validate(self, prefix: str = "plan") -> None:
        for key in ("gpu_memory_gb", "peak_tflops", "gpu_hours_per_trillion_tokens", "tokens_per_s", "tokens"):
            value = getattr(self, key)
            require(value is None or value > 0, f"{prefix}.{key}", f"must be positive (or null), got {value}")
        require(self.gpus is None or self.gpus >= 1, f"{prefix}.gpus", f"must be >= 1, got {self.gpus}")
        require(0 < self.mfu <= 1, f"{prefix}.mfu", f"must be in (0, 1], got {self.mfu}")
        require(self.reserved_gb >= 0 and self.price_per_gpu_hour >= 0, f"{prefix}.reserved_gb",
                "reserved_gb and price_per_gpu_hour must be >= 0")
        for name, hours in self.extra_gpu_hours.items():
            require(hours >= 0, f"{prefix}.extra_gpu_hours.{name}", f"must be >= 0, got {hours}")


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)  # read by `moetrain plan` only
