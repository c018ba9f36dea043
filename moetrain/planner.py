"""``moetrain plan [--json] [overrides]``: parameters, FLOPs, per-GPU memory, traffic, time and cost of a job
before launch, from the config alone (the same Hydra composition and checks as ``moetrain train``).

Memory is counted per pipeline rank (ranks hold different stages) and the fullest one decides whether the layout
fits; when it does not, the nearest layout that does is suggested (recomputation, ZeRO / FSDP, more ep or pp, a
smaller micro-batch). See :mod:`moetrain.memory_model` for what is counted and what is assumed.
"""

from __future__ import annotations

import copy
import itertools
import json
import sys
from dataclasses import dataclass, replace

from moetrain.config import ConfigError, JobConfig
from moetrain.memory_model import (RECOMPUTE_MODES, Activations, activation_bytes_per_token,
                                   in_flight_microbatches, loss_working_bytes, recompute_working_bytes,
                                   state_bytes)
from moetrain.plan import (GPU_MEMORY_GB, PEAK_TFLOPS, block_params, lookup_device, mtp_module_params,
                           parameter_counts, training_flops_per_token)

GB = 1e9

USAGE = """usage: moetrain plan [--json] [overrides]

Memory per GPU, traffic, step time and cost of the job the overrides describe (as `moetrain train` would run it),
for plan.gpus GPUs of type plan.gpu. Examples:
  moetrain plan model=proxy parallel=node8 train.seq_len=4096 train.global_batch_size=64 train.micro_batch_size=1
  moetrain plan model=deepseek_v3_671b parallel=deepseek_v3_2048 experiment=deepseek_v3 plan=deepseek_v3_report
"""


@dataclass
class RankPlan:
    """One pipeline rank: what it holds and what that costs in memory (bytes)."""

    pp_rank: int
    layers: list[int]
    first: bool
    last: bool
    params: float  # local parameters (experts divided by ep)
    weights: float
    gradients: float
    optimizer: float
    activations: float  # kept by the micro-batches in flight
    in_flight: float
    per_microbatch: dict[str, float]  # activations one micro-batch keeps over all the rank's stages, by recompute mode
    recompute_working: float
    all_to_all_buffers: float
    reserved: float

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.recompute_working
                + self.all_to_all_buffers + self.reserved)


def _compute_bytes(job: JobConfig) -> int:
    """Bytes of the compute dtype on a GPU: fp32 only when asked for; bf16 otherwise (FP8 counted as bf16)."""
    return 4 if job.precision.dtype == "fp32" else 2


def _chunks(job: JobConfig) -> int:
    """Pipeline stages per rank."""
    if job.parallel.pp == 1:
        return 1
    from moetrain.parallel.pipeline_layout import chunks_per_rank, schedule_spec

    return chunks_per_rank(schedule_spec(job.parallel.pp_schedule), job.parallel.pp_chunks)


def _stages(job: JobConfig) -> tuple[list[list[int]], list[int]]:
    """(block ids of each pipeline stage, the pp rank of each stage)."""
    p, cfg = job.parallel, job.model
    if p.pp == 1:
        return [list(range(cfg.n_layers))], [0]
    from moetrain.parallel.pipeline_layout import chunks_per_rank, resolve_layout, schedule_spec, stage_ranks

    spec = schedule_spec(p.pp_schedule)
    n_stages = p.pp * chunks_per_rank(spec, p.pp_chunks)
    return resolve_layout(cfg, n_stages, p.pp_layout, job.train.seq_len), stage_ranks(p.pp, n_stages, spec.v_shaped)


def plan_ranks(job: JobConfig, gpus: int) -> list[RankPlan]:
    cfg, p, t = job.model, job.parallel, job.train
    a = _compute_bytes(job)
    dp = p.data_parallel_size(gpus)
    edp = dp // p.ep
    m = t.grad_accum_steps
    tokens_mb = t.micro_batch_size * t.seq_len
    x = Activations(a=a, mode=t.recompute, attention="fused", seq_len=t.seq_len, stage_logits=p.pp > 1,
                    loss_chunk=t.loss_chunk_tokens)
    stages, owner = _stages(job)
    S = len(stages)
    ranks = []
    for r in range(p.pp):
        mine = [s for s in range(S) if owner[s] == r]
        layers, first, last = [i for s in mine for i in stages[s]], 0 in mine, S - 1 in mine
        units = [block_params(cfg, i) for i in layers]
        if last:
            units += [mtp_module_params(cfg, k) for k in range(1, cfg.n_mtp_layers + 1)]
        dense = sum(d for d, _ in units) + (cfg.vocab_size * cfg.dim if first else 0)
        if last:  # final norm and head; a pipeline's last rank also holds MTP's copy of the embedding
            dense += cfg.dim + cfg.vocab_size * cfg.dim + (cfg.vocab_size * cfg.dim if p.pp > 1 and cfg.n_mtp_layers
                                                           and not first else 0)
        experts = sum(e for _, e in units) / p.ep
        largest_unit = max([d + e / p.ep for d, e in units] + [cfg.vocab_size * cfg.dim])
        state = state_bytes(dense, experts, largest_unit, strategy=p.dp_strategy, zero_stage=p.zero_stage,
                            offload=p.offload_optimizer, dp=dp, edp=edp, a=a, pp=p.pp)
        per_mb = {mode: tokens_mb * sum(activation_bytes_per_token(cfg, stages[s], replace(x, mode=mode), s == 0,
                                                                   s == S - 1) for s in mine)
                  for mode in RECOMPUTE_MODES}
        kept, in_flight = 0.0, 0.0
        for s in mine:  # each stage's micro-batches in flight keep that stage's activations
            n = in_flight_microbatches(p.pp_schedule, p.pp, S, s, m)
            kept += n * tokens_mb * activation_bytes_per_token(cfg, stages[s], x, s == 0, s == S - 1)
            in_flight = max(in_flight, n)
        working = tokens_mb * recompute_working_bytes(cfg, layers, x)
        if last:  # one head's loss at a time: the fp32 gradient of its logits, or of one chunk's
            working += loss_working_bytes(cfg, tokens_mb, x)
        has_moe = any(i >= cfg.moe.first_k_dense_replace for i in layers) or (last and cfg.n_mtp_layers)
        a2a = 2 * tokens_mb * cfg.moe.router.topk * cfg.dim * a if p.ep > 1 and has_moe else 0.0
        ranks.append(RankPlan(r, layers, first, last, dense + experts, state.weights, state.gradients,
                              state.optimizer, kept, in_flight, per_mb, working, a2a, job.plan.reserved_gb * GB))
    return ranks


def _traffic(job: JobConfig, gpus: int, rank: RankPlan) -> dict[str, float]:
    """Bytes one GPU of ``rank`` sends per optimizer step (ring collectives: (n - 1) / n of the data each way)."""
    cfg, p, t = job.model, job.parallel, job.train
    a, m = _compute_bytes(job), t.grad_accum_steps
    tokens_mb = t.micro_batch_size * t.seq_len
    dp = p.data_parallel_size(gpus)
    moe_layers = sum(i >= cfg.moe.first_k_dense_replace for i in rank.layers) + (cfg.n_mtp_layers if rank.last else 0)
    out = {"all_to_all": 0.0, "pipeline": 0.0, "data_parallel": 0.0}
    if p.ep > 1:  # dispatch and combine, forward and backward, of every MoE layer and micro-batch
        out["all_to_all"] = moe_layers * m * 4 * tokens_mb * cfg.moe.router.topk * cfg.dim * a * (p.ep - 1) / p.ep
    if p.pp > 1:  # each stage of the rank sends its activations forward and its input gradients back
        out["pipeline"] = m * 2 * tokens_mb * cfg.dim * a * _chunks(job)
    ring = (dp - 1) / dp if dp > 1 else 0.0
    P = rank.params
    if p.dp_strategy == "fsdp":  # gathers in the compute dtype, reduce-scatters fp32 gradients
        # every micro-batch (forward and backward gathers each); in a pipeline once per step (torch's schedule)
        out["data_parallel"] = ring * P * ((a + 4) if p.pp > 1 else (2 * a + 4) * m)
    elif p.dp_strategy == "ddp":
        out["data_parallel"] = ring * P * 4 * 2
    else:  # deepspeed: gradients reduced (every micro-batch at ZeRO-2), parameters gathered after the step
        out["data_parallel"] = ring * P * (a * (m if p.zero_stage >= 2 else 2) + a)
    return out


def _speed(job: JobConfig, gpus: int, flops_per_token: float, peak: float | None) -> dict:
    pl = job.plan
    if pl.gpu_hours_per_trillion_tokens:
        per_gpu, source = 1e12 / (pl.gpu_hours_per_trillion_tokens * 3600), "plan.gpu_hours_per_trillion_tokens"
    elif pl.tokens_per_s:
        per_gpu, source = pl.tokens_per_s / gpus, "plan.tokens_per_s"
    else:
        if not peak:
            raise ConfigError("plan.peak_tflops", f"no datasheet peak for plan.gpu={pl.gpu!r}; set plan.peak_tflops "
                                                  "or a measured plan.tokens_per_s")
        per_gpu, source = pl.mfu * peak * 1e12 / flops_per_token, "plan.mfu"
    mfu = per_gpu * flops_per_token / (peak * 1e12) if peak else None
    global_tokens = job.train.global_batch_size * job.train.seq_len
    return {"source": source, "tokens_per_s": per_gpu * gpus, "tokens_per_s_per_gpu": per_gpu, "mfu": mfu,
            "step_s": global_tokens / (per_gpu * gpus), "tokens_per_step": global_tokens}


def make_plan(job: JobConfig, gpus: int) -> dict:
    """The plan of ``job`` on ``gpus`` GPUs, as plain numbers (what ``--json`` prints)."""
    cfg, p, t, pl = job.model, job.parallel, job.train, job.plan
    memory_gb = pl.gpu_memory_gb or lookup_device(GPU_MEMORY_GB, pl.gpu)
    if memory_gb is None:
        raise ConfigError("plan.gpu_memory_gb", f"no datasheet memory for plan.gpu={pl.gpu!r}; set plan.gpu_memory_gb")
    peak = pl.peak_tflops or lookup_device(PEAK_TFLOPS, pl.gpu)
    flops = training_flops_per_token(cfg, t.seq_len)
    ranks = plan_ranks(job, gpus)
    worst = max(ranks, key=lambda r: r.total)
    speed = _speed(job, gpus, flops, peak)
    tokens = pl.tokens or t.steps * speed["tokens_per_step"]
    hours = tokens / speed["tokens_per_s"] / 3600
    gpu_hours = hours * gpus
    total_gpu_hours = gpu_hours + sum(pl.extra_gpu_hours.values())
    dp = p.data_parallel_size(gpus)
    return {
        "model": {"params_total": parameter_counts(cfg)["total"], "params_mtp": parameter_counts(cfg)["mtp"],
                  "params_active": parameter_counts(cfg)["active"], "params_routed": parameter_counts(cfg)["routed"],
                  "flops_per_token": flops, "seq_len": t.seq_len},
        "layout": {"gpus": gpus, "gpu": pl.gpu, "pp": p.pp, "dp": dp, "ep": p.ep, "edp": dp // p.ep,
                   "dp_strategy": p.dp_strategy, "zero_stage": p.zero_stage if p.dp_strategy == "deepspeed" else None,
                   "pp_schedule": p.pp_schedule if p.pp > 1 else None, "micro_batches": t.grad_accum_steps,
                   "micro_batch_size": t.micro_batch_size, "global_batch_size": t.global_batch_size,
                   "recompute": t.recompute, "loss_chunk_tokens": t.loss_chunk_tokens,
                   "compute_bytes": _compute_bytes(job)},
        "memory_gb": {"gpu": memory_gb, "worst_pp_rank": worst.pp_rank, "weights": worst.weights / GB,
                      "gradients": worst.gradients / GB, "optimizer": worst.optimizer / GB,
                      "activations": worst.activations / GB, "in_flight_microbatches": worst.in_flight,
                      "activations_per_microbatch": {k: v / GB for k, v in worst.per_microbatch.items()},
                      "recompute_working": worst.recompute_working / GB,
                      "all_to_all_buffers": worst.all_to_all_buffers / GB, "reserved": worst.reserved / GB,
                      "total": worst.total / GB, "fits": worst.total / GB <= memory_gb,
                      "per_pp_rank": [round(r.total / GB, 2) for r in ranks]},
        "traffic_gb_per_step": {k: v / GB for k, v in _traffic(job, gpus, worst).items()},
        "speed": speed,
        "budget": {"tokens": tokens, "days": hours / 24, "gpu_hours": gpu_hours,
                   "extra_gpu_hours": dict(pl.extra_gpu_hours), "total_gpu_hours": total_gpu_hours,
                   "price_per_gpu_hour": pl.price_per_gpu_hour, "cost": total_gpu_hours * pl.price_per_gpu_hour},
    }


# --------------------------------------------------------------------------------------- suggestions
# Each move: (cost, overrides) for a job, or None where it does not apply; cheaper first (recomputing norms and
# up-projections costs little time, sharding costs communication, more pp costs bubble, full recompute ~1/3).
def _moves(job: JobConfig, gpus: int):
    p, t, E = job.parallel, job.train, job.model.moe.n_routed_experts
    dp = p.data_parallel_size(gpus)
    if t.recompute == "none":
        yield 1, {"train.recompute": "selective"}
    if p.dp_strategy == "ddp":
        yield 1, {"parallel.dp_strategy": "fsdp"}
    if p.dp_strategy == "deepspeed" and p.zero_stage < 2:
        yield 1, {"parallel.zero_stage": 2}
    if t.micro_batch_size > 1:
        yield 2, {"train.micro_batch_size": t.micro_batch_size // 2}
    if dp % (2 * p.ep) == 0 and E % (2 * p.ep) == 0:
        yield 2, {"parallel.ep": 2 * p.ep}
    if gpus % (2 * p.pp) == 0:
        new_dp = gpus // (2 * p.pp)
        move = {"parallel.pp": 2 * p.pp, "parallel.dp": new_dp if p.dp != -1 else -1}
        if p.dp_strategy != "fsdp":
            move["parallel.dp_strategy"] = "fsdp"
        if new_dp % p.ep:
            move["parallel.ep"] = max(e for e in range(1, p.ep + 1) if new_dp % e == 0 and E % e == 0)
        yield 3, move
    if t.recompute != "full":
        yield 3, {"train.recompute": "full"}
    if p.dp_strategy == "deepspeed" and not p.offload_optimizer:
        yield 4, {"parallel.offload_optimizer": True}


def _apply(job: JobConfig, overrides: dict) -> JobConfig:
    new = copy.deepcopy(job)
    for key, value in overrides.items():
        group, name = key.split(".")
        setattr(getattr(new, group), name, value)
    return new


def _with_batch(job: JobConfig, gpus: int) -> JobConfig:
    """The job checked for ``gpus`` ranks, grad_accum_steps derived anew for its layout."""
    from moetrain.config import validate_job

    job.train.grad_accum_steps = None
    return validate_job(job, gpus)


def suggest(job: JobConfig, gpus: int, memory_gb: float) -> dict | None:
    """The cheapest change of one or two moves after which every rank fits, as overrides (None: none found)."""
    found = []
    for n in (1, 2):
        for combo in itertools.combinations(list(_moves(job, gpus)), n):
            overrides = {}
            for _, o in combo:
                if set(o) & set(overrides):
                    break
                overrides.update(o)
            else:
                try:
                    new = _with_batch(_apply(job, overrides), gpus)
                    total = max(r.total for r in plan_ranks(new, gpus)) / GB
                except (ConfigError, ValueError):
                    continue
                if total <= memory_gb:
                    found.append((sum(c for c, _ in combo), total, overrides))
        if found:
            break
    if not found:
        return None
    cost, total, overrides = min(found, key=lambda f: (f[0], f[1]))
    return {"overrides": [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items()],
            "total_gb": total}


# ------------------------------------------------------------------------------------------- output
def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def _millions(n: float, big: bool) -> str:
    """Millions with three decimals (2.788M) as the V3 report writes them, or the amount as it is."""
    return f"{n / 1e6:.3f}M" if big else f"{n:,.1f}"


def render_table(plan: dict) -> str:
    md, lay, mem, tr, sp, bu = (plan[k] for k in ("model", "layout", "memory_gb", "traffic_gb_per_step", "speed",
                                                   "budget"))
    mfu = f"{100 * sp['mfu']:.1f}%" if sp["mfu"] is not None else "n/a"
    big = bu["total_gpu_hours"] >= 1e5
    layout = (f"{lay['gpus']} x {lay['gpu']}: pp {lay['pp']}" + (f" ({lay['pp_schedule']})" if lay["pp_schedule"] else "")
              + f" x dp {lay['dp']} ({lay['dp_strategy']}" + (f" ZeRO-{lay['zero_stage']}" if lay["zero_stage"] else "")
              + f"), ep {lay['ep']} (edp {lay['edp']}); {lay['micro_batches']} micro-batch(es) of "
              f"{lay['micro_batch_size']} x {md['seq_len']} tokens per step, recompute {lay['recompute']}")
    rows = [
        ("parameters", f"{_count(md['params_total'])} total, {_count(md['params_active'])} active per token, "
                       f"{_count(md['params_mtp'])} MTP, {_count(md['params_routed'])} in routed experts"),
        ("training FLOPs", f"{md['flops_per_token'] / 1e9:.1f} GFLOPs per token (6 x active + attention)"),
        ("layout", layout),
        ("memory per GPU", f"{mem['total']:.1f} GB of {mem['gpu']:.0f} GB on pp rank {mem['worst_pp_rank']} "
                           f"({'fits' if mem['fits'] else 'DOES NOT FIT'})"),
        ("  weights", f"{mem['weights']:.2f} GB"),
        ("  gradients", f"{mem['gradients']:.2f} GB"),
        ("  optimizer", f"{mem['optimizer']:.2f} GB (fp32 master and Adam moments where sharded so)"),
        ("  activations", f"{mem['activations']:.2f} GB ({mem['in_flight_microbatches']:g} micro-batch(es) in flight)"),
        ("   per micro-batch", ", ".join(f"{k} {v:.2f} GB" for k, v in mem["activations_per_microbatch"].items())
         + " (train.recompute=...)"),
        ("  recompute/loss", f"{mem['recompute_working']:.2f} GB while backward runs"
                             + (f" (loss in chunks of {lay['loss_chunk_tokens']} tokens)" if lay["loss_chunk_tokens"]
                                else "")),
        ("  all-to-all", f"{mem['all_to_all_buffers']:.2f} GB of dispatch buffers"),
        ("  reserved", f"{mem['reserved']:.2f} GB (plan.reserved_gb)"),
        ("  per pp rank", ", ".join(f"{g:.1f}" for g in mem["per_pp_rank"]) + " GB"),
        ("traffic per step", f"all-to-all {tr['all_to_all']:.2f} GB, pipeline {tr['pipeline']:.2f} GB, "
                             f"data-parallel {tr['data_parallel']:.2f} GB per GPU"),
        ("speed", f"{sp['tokens_per_s']:,.0f} tokens/s ({sp['tokens_per_s_per_gpu']:,.0f} per GPU, MFU {mfu}, "
                  f"from {sp['source']}), {sp['step_s']:.2f} s per step of {_count(sp['tokens_per_step'])} tokens"),
    ]
    rows += [  # GPU-hours and dollars in millions once they reach a tenth of one
        ("budget", f"{_count(bu['tokens'])} tokens in {bu['days'] * 24:,.1f} hours ({bu['days']:.1f} days) = "
                   f"{_millions(bu['gpu_hours'], big)} GPU-hours"
                   + "".join(f" + {_millions(h, big)} {name}" for name, h in bu["extra_gpu_hours"].items())),
        ("cost", f"{_millions(bu['total_gpu_hours'], big)} GPU-hours x ${bu['price_per_gpu_hour']:g} = "
                 f"${_millions(bu['cost'], bu['cost'] >= 1e5)}")]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    for w in plan.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    as_json = "--json" in argv
    overrides = [a for a in argv if a != "--json"]
    from moetrain.config import compose, to_job_config

    try:
        cfg = compose(overrides)
        gpus = cfg.plan.gpus or (cfg.parallel.dp * cfg.parallel.pp if cfg.parallel.dp != -1 else 1)
        job = to_job_config(cfg, gpus)  # the layout checked as `moetrain train` would on that many ranks
        plan = make_plan(job, gpus)
    except Exception as e:
        from moetrain.errors import user_error

        status, message = user_error(e, composing=True)
        if status is None:
            raise
        print(f"moetrain: error: {message}", file=sys.stderr)
        return status
    mem = plan["memory_gb"]
    plan["warnings"] = []
    if not mem["fits"]:
        s = suggest(job, gpus, mem["gpu"])
        plan["suggestion"] = s
        plan["warnings"].append(
            f"pp rank {mem['worst_pp_rank']} needs {mem['total']:.1f} GB, more than the {mem['gpu']:.0f} GB of a "
            f"{job.plan.gpu}; " + (f"nearest layout that fits ({s['total_gb']:.1f} GB): {' '.join(s['overrides'])}"
                                   if s else "no layout within two changes fits: more GPUs, or a GPU with more memory"))
    if job.train.batch_ramp_start:
        plan["warnings"].append(f"planned at the full batch ({job.train.global_batch_size}); the ramp's first steps "
                                f"run {job.train.batch_ramp_start} sequences")
    print(json.dumps(plan, indent=2) if as_json else render_table(plan))
    return 0
