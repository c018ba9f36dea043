"""The training program: ``moetrain train [overrides]`` or ``python -m moetrain.train [overrides]``.

Flow per optimizer step: the loader hands this rank its micro-batches -> forward/backward of each, the loss
normalised by the target tokens of the whole global batch -> gradient clipping -> AdamW -> the auxiliary-loss-free
bias update from the per-expert counts summed over all ranks -> metrics -> validation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.errors import record

from moetrain.checkpoint import CheckpointError, CheckpointManager
from moetrain.config import JobConfig, register_configs, to_job_config
from moetrain.data import Blend, DataLoader, build_sources, make_batch
from moetrain.data.indexed import ShardError
from moetrain.hf import HFFormatError
from moetrain.metrics import MetricsLogger, log_text, memory_gb
from moetrain.model import ConfigError, build_model, collect_expert_counts, lm_output, update_expert_bias
from moetrain.model.balance import pop_balance_loss, routers
from moetrain.model.layers import is_recomputing
from moetrain.model.moe import MoE
from moetrain.optim import build_optimizer, set_lr
from moetrain.parallel.dist import DistInfo, adopt_slurm_ranks, destroy, finish, init_distributed
from moetrain.parallel.init import init_weights
from moetrain.parallel.mesh import all_reduce_sum, build_mesh
from moetrain.parallel.recompute import apply_recompute
from moetrain.parallel.strategy import build_strategy
from moetrain.plan import peak_tflops, training_flops_per_token
from moetrain.precision import Precision
from moetrain.profiling import StepProfiler
from moetrain.resources import conf_dir
from moetrain.run_dir import RankLog, RunDirLock, RunDirLocked
from moetrain.schedules import bias_update_speed_at, global_batch_at, lr_at, mtp_lambda_at


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm stayed non-finite for train.max_nonfinite_steps steps."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, job: JobConfig, dist_info: DistInfo | None = None):
        self.job = job
        self.dist = dist_info or init_distributed(job.train.device)
        self.device = self.dist.device
        self.mesh = build_mesh(job.parallel, self.dist.world_size, self.device.type)
        self.dp = self.mesh.dp
        self.run_dir = Path(job.run.dir)
        self.is_main = self.dist.is_main
        self._created_run_dir = self.is_main and not self.run_dir.exists()
        self._lock = self._lock_run_dir()
        self._started = False  # set when fit() starts; a run refused before that leaves no trace
        self._rank_log = RankLog(self.run_dir, self.dist.rank)  # run.dir/logs/rank_<r>.log, written when needed
        with self._abandon_on_error():
            self._setup()

    def _setup(self) -> None:
        job = self.job
        seed_everything(job.train.seed)
        self.precision = Precision(job.precision, self.device, self._warn)
        self.compute_dtype = self.precision.compute_dtype  # of everything but FP8 GEMMs
        # On GPU, FSDP gathers bf16 parameters (fp32 masters, fp32 gradient reduction); on CPU autocast alone.
        param_dtype = self.compute_dtype if self.device.type == "cuda" else torch.float32
        self.strategy = build_strategy(job.parallel.dp_strategy, self.mesh, param_dtype, self._deepspeed_config())

        self.pipeline = None  # pp > 1: this rank's stages and their schedule (moetrain.parallel.pipeline)
        # The model (on a pipeline rank: the part it owns): state dicts, balance state, metrics.
        self.model, n_params = self._build_model()
        # What forward runs on (the model, its DDP wrapper, the DeepSpeed engine) and the optimizer to step.
        self.module, self.optimizer = self.strategy.wrap(self.model, lambda m: build_optimizer(m, job.optim))
        self.sources = self._build_sources()
        self.loader = DataLoader(self.sources.samples, self.sources.train_ranges, self.sources.weights, job.data.seed,
                                 self.mesh.dp_rank, self.dp, job.train.micro_batch_size,
                                 self.sources.blend_id, job.data.prefetch)
        self.step, self.tokens_seen = 0, 0
        self.flops_per_token = training_flops_per_token(job.model, job.train.seq_len)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.peak = job.logging.peak_tflops or peak_tflops(name)
        self.metrics = MetricsLogger(job.logging, self.run_dir, job.train.steps, self.is_main,
                                     OmegaConf.to_container(OmegaConf.structured(job)))
        self.ckpt = CheckpointManager(job.checkpoint.dir, job.checkpoint.keep_last, self.dist.rank,
                                      self.dist.world_size, self._log, job.checkpoint.async_save, self.strategy)
        self.profiler = StepProfiler(job.train.profile, self.dist.rank, self.run_dir, self.device)
        self._stop_signal: int | None = None
        self._preempted = False
        self._nonfinite_steps = 0  # consecutive
        self._expert_load_LE = None  # global per-expert token counts of this rank's MoE layers since the last record
        self._log(f"moetrain: {self.job.model.n_layers} layers, {n_params / 1e6:.2f}M parameters, "
                  f"{self.dp} data-parallel rank(s){f' (ep {self.mesh.ep})' if self.mesh.ep > 1 else ''}"
                  f"{self._pipeline_note()} on {name}{_kernels_note(self.device)}, compute {self.precision}, "
                  f"{sum(r[1] - r[0] for r in self.sources.train_ranges)} training samples of {job.train.seq_len} "
                  f"tokens{_entropy_note(self.sources.unigram_entropy)}; run dir {self.run_dir}")

    # ------------------------------------------------------------------------------------------- checkpoints
    def resume_or_init(self) -> None:
        """Continue from checkpoint.resume, else start from checkpoint.init_from_hf, else from scratch."""
        with self._abandon_on_error():
            self._resume_or_init()
            if self.pipeline is not None:
                self.pipeline.after_step()  # a V-shaped rank's copy of the embedding takes the loaded values
                self.pipeline.check_tied()

    def _resume_or_init(self) -> None:
        path = self.ckpt.find_resume(self.job.checkpoint.resume)
        if path is not None:
            self._check_same_model(path)
            state = self.ckpt.load(path, self.model, self.optimizer)
            if state.get("kind") == "model":
                self._log(f"checkpoint: {path} holds weights only; training starts at step 0 from them")
                return
            self._check_same_data(path, state)
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self._log(f"checkpoint: continuing after step {self.step} ({self.tokens_seen} tokens seen)")
        elif self.job.checkpoint.init_from_hf:
            self._init_from_hf(self.job.checkpoint.init_from_hf)

    def _check_same_model(self, path: Path) -> None:
        """Refuse, naming the key, a checkpoint of another architecture (before any tensor is read)."""
        saved = OmegaConf.to_container(OmegaConf.load(path / "config.yaml").model)
        key = _architecture_mismatch(saved, self.job.model)
        if key:
            raise ConfigError(key, f"checkpoint {path} was saved with a different value than this run's; use a "
                                   "new run.dir, checkpoint.resume=none, or the checkpoint's model settings")

    def _check_same_data(self, path: Path, state: dict) -> None:
        """Refuse a resume whose data differs from the checkpoint's (the loader position would mean other
        samples), unless checkpoint.allow_data_change; then continue at the same sample count."""
        saved, mine = state.get("data"), self._data_identity()
        differs = _data_mismatch(saved, mine) if saved is not None else None
        loader_state = state["loader"]
        if differs is None and saved is None:  # a checkpoint from before data identities: the loader checks
            self.loader.load_state_dict(loader_state)
            return
        if differs is not None:
            key, was, now = differs
            if not self.job.checkpoint.allow_data_change:
                raise ConfigError(key, f"checkpoint {path} was trained with {was}, this run has {now}; the data "
                                       "position would select other samples. Restore it, or set "
                                       "checkpoint.allow_data_change=true to continue at the same sample count")
            self._warn(f"checkpoint: {key} changed since {path.name} ({was} -> {now}); continuing at sample "
                       f"{loader_state['consumed']} of the new data order (checkpoint.allow_data_change=true)")
            loader_state = {**loader_state, "seed": self.loader.seed, "blend": self.loader.blend_id}
        self.loader.load_state_dict(loader_state)

    def _data_identity(self) -> dict:
        """What the loader position means: sequence length, order seed, split, and each source's contents."""
        data = self.job.data
        return {"train.seq_len": self.job.train.seq_len, "data.seed": data.seed, "data.val_fraction": data.val_fraction,
                "data.paths": [[name, weight, len(samples), _contents_digest(samples.tokens)] for (name, weight),
                               samples in zip(self.sources.blend_id, self.sources.samples)]}

    def _init_from_hf(self, hf_dir: str) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from moetrain.hf import config_from_hf, from_hf_pretrained, read_json

        hf_cfg = config_from_hf(read_json(Path(hf_dir) / "config.json"))
        # RoPE and the MTP depth may differ: neither changes the shapes of the weights that are loaded.
        key = _architecture_mismatch(dataclasses.asdict(hf_cfg), self.job.model, ignore=("rope", "n_mtp_layers"))
        if key:
            raise ValueError(f"checkpoint.init_from_hf: {hf_dir} has a different {key} than this run; "
                             "choose the matching model preset")
        full = from_hf_pretrained(hf_dir).state_dict()
        missing = [k for k in self.model.state_dict() if k not in full]
        if any(not k.startswith("mtp.") for k in missing):
            raise ValueError(f"checkpoint.init_from_hf: {hf_dir} lacks {missing[:3]}")
        if missing:
            self._log(f"checkpoint: {hf_dir} has no MTP weights; the MTP modules start from their initialisation")
        if self.job.parallel.dp_strategy == "deepspeed":  # ZeRO's fp32 masters must receive the weights too
            self.strategy.load_state_dict(self.model, self.optimizer,
                                          {k: v for k, v in full.items() if k in self.model.state_dict()}, None)
        else:
            set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True, strict=False))
        self._log(f"checkpoint: initialised from Hugging Face weights in {hf_dir}")

    def save_checkpoint(self) -> None:
        state = {"kind": "train", "step": self.step, "tokens_seen": self.tokens_seen,
                 "loader": self.loader.state_dict(), "data": self._data_identity()}
        self.ckpt.save(self.step, self.model, self.optimizer, state,
                       OmegaConf.to_yaml(OmegaConf.structured(self.job)))

    # ---------------------------------------------------------------------------------------------- run dir
    def _lock_run_dir(self) -> RunDirLock | None:
        """Rank 0 takes the run directory's lock before writing anything; every rank learns if it failed."""
        lock, refusal = None, None
        if self.is_main:
            try:
                lock = RunDirLock(self.run_dir).acquire()
            except RunDirLocked as e:
                refusal = e
        if self.dist.world_size > 1:
            import torch.distributed as dist

            flag = torch.tensor(float(refusal is not None), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and refusal is None:
                refusal = RunDirLocked(f"run.dir {self.run_dir} is in use by another run (see rank 0)")
        if refusal is not None:
            raise refusal
        if lock is not None and lock.stale_holder:
            holder = lock.stale_holder
            self._log(f"run.dir: taking over from a run that ended without releasing it (host {holder.get('host')}, "
                      f"pid {holder.get('pid')})")
        return lock

    def _start(self) -> None:
        """The run is accepted: record its resolved config (only now, so a refused run overwrites nothing)."""
        if self.is_main and not self._started:
            tmp = self.run_dir / "config.yaml.tmp"
            OmegaConf.save(OmegaConf.structured(self.job), tmp)
            os.replace(tmp, self.run_dir / "config.yaml")
        self._started = True

    @contextlib.contextmanager
    def _abandon_on_error(self):
        """A refusal or failure before the first step releases (and, if this run made it, removes) run.dir."""
        try:
            yield
        except BaseException as e:
            self._rank_log.error(f"stopped before training: {type(e).__name__}: {e}")
            self.abandon()
            raise

    def close(self) -> None:
        """Release the run directory without training (``fit`` releases it itself when it ends)."""
        self.abandon()

    def abandon(self) -> None:
        """Release the run directory; if this run created it and never trained a step, remove it."""
        self._rank_log.close()
        if self._created_run_dir and not self._started:  # still locked: no other run can have taken it over
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if self._lock is not None:
            self._lock.release()

    def _warn(self, message: str) -> None:
        if self.is_main:
            import warnings

            warnings.warn(message, stacklevel=2)
            self._log(f"WARNING: {message}")

    def _install_signal_handlers(self) -> None:
        """SIGTERM / SIGUSR1 (Slurm's warning before the time limit): checkpoint at the next step, then exit."""
        def request_stop(signum, frame):
            self._stop_signal = signum

        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, request_stop)

    def _stop_requested(self) -> bool:
        flag = torch.tensor(float(self._stop_signal is not None), device=self.device)
        if self.dist.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item())

    # ------------------------------------------------------------------------------------------------ setup
    def _deepspeed_config(self) -> dict | None:
        if self.job.parallel.dp_strategy != "deepspeed":
            return None
        from moetrain.parallel.zero import deepspeed_config

        job = self.job
        return deepspeed_config(job.train.micro_batch_size, job.train.grad_accum_steps, job.optim.grad_clip,
                                job.parallel.zero_stage, job.parallel.offload_optimizer,
                                self.compute_dtype == torch.bfloat16)

    def _build_model(self):
        """(the model or this pipeline rank's part of it, initialised; the whole model's parameter count)."""
        job = self.job
        model = build_model(job.model, "meta")
        n_params = _count(model)
        self.precision.convert(model, self._log)  # FP8 modules keep every parameter's name and shape
        stages = None
        if self.mesh.pp > 1:
            model, stages = self._split_stages(model)
        apply_recompute(model, job.train.recompute)
        if self.mesh.ep > 1:
            from moetrain.parallel.expert_parallel import apply_expert_parallel

            apply_expert_parallel(model, self.mesh.device_mesh["ep"], job.parallel.capacity_factor)
        self.strategy.parallelize(model, stages)
        model.to_empty(device=self.device)
        for stage in stages or []:  # a V-shaped rank's copy of the embedding is in a stage only
            stage.to_empty(device=self.device)
        init_weights(model, job.train.seed)
        if stages:
            for stage in stages:
                stage.freqs_cis = model.freqs_cis
            self.pipeline.after_step()  # the copy of the embedding takes its values
        if job.train.compile:
            for block in list(model.layers.values()) + [m.block for m in model.mtp.values()]:
                block.compile()
        return model.train(), n_params

    def _split_stages(self, model):
        from moetrain.parallel.pipeline import Pipeline, split_stages
        from moetrain.parallel.pipeline_layout import (chunks_per_rank, resolve_layout, schedule_spec,
                                                       stages_of_rank)

        par, mesh = self.job.parallel, self.mesh
        spec = schedule_spec(par.pp_schedule)
        n_stages = mesh.pp * chunks_per_rank(spec, par.pp_chunks)
        layout = resolve_layout(self.job.model, n_stages, par.pp_layout, self.job.train.seq_len)
        stage_ids = stages_of_rank(mesh.pp_rank, mesh.pp, n_stages, spec.v_shaped)
        model, stages = split_stages(model, layout, stage_ids)
        for stage in stages:
            stage.train()
        self.pipeline = Pipeline(spec, layout, stage_ids, stages, mesh, self.device, self.job.train.recompute != "none")
        return model, stages

    def _pipeline_note(self) -> str:
        if self.pipeline is None:
            return ""
        p = self.pipeline
        return (f" x {self.mesh.pp} pipeline ranks ({p.spec.name}, stages of blocks "
                f"{[[ids[0], ids[-1]] if len(ids) > 1 else ids for ids in p.layout]})")

    def _build_sources(self):
        """Local rank 0 prepares (or downloads) shared cached data first; the other ranks then read it."""
        args = (self.job.data, self.job.train.seq_len, self.job.model.vocab_size)
        if self.dist.world_size == 1:
            return build_sources(*args)
        import torch.distributed as dist

        sources = build_sources(*args) if self.dist.local_rank == 0 else None
        dist.barrier()
        return sources if sources is not None else build_sources(*args)

    def _autocast(self):
        return self.precision.autocast(self.mesh.dp_group)

    def _log(self, line: str) -> None:
        log_text(self.run_dir, line, self.is_main)

    # ------------------------------------------------------------------------------------------------ loop
    def fit(self) -> list[float]:
        """Train until train.steps (or train.stop_at); returns the loss of every step run."""
        try:
            self._start()
            losses = self._fit()
            self.ckpt.wait()  # the last checkpoint is complete before anyone is told so
            if self._preempted:
                self._mark_preempted()
            return losses
        except BaseException as e:
            self._rank_log.error(f"training stopped at step {self.step}: {type(e).__name__}: {e}")
            raise
        finally:
            try:
                self.ckpt.wait()  # a background save of an earlier (finite) step
            finally:
                self.profiler.close()
                self.metrics.close()
                self.abandon()

    def _fit(self) -> list[float]:
        job, losses = self.job, []
        last = job.train.steps if job.train.stop_at < 0 else min(job.train.stop_at, job.train.steps)
        self._install_signal_handlers()
        self.metrics.begin(self.step)
        saved_at = self.step
        while self.step < last:
            self.step += 1
            self.profiler.step_begin(self.step)
            t0 = time.perf_counter()
            stats = self.train_step()
            step_seconds = time.perf_counter() - t0
            trace = self.profiler.step_end(self.step)
            if trace:
                message = f"profile: steps {job.train.profile.steps} of rank {self.dist.rank} in {trace}"
                self._rank_log.info(message)
                self._log(message)
            losses.append(stats["loss"])
            validate = bool(job.train.val_interval) and self.step % job.train.val_interval == 0
            if validate:
                stats["val_loss"] = self.validate()
            if self.step % job.logging.interval == 0 or self.step == last or validate or stats["skipped"]:
                self._log_step(stats, step_seconds)
            self._check_finite(stats)
            if self._stop_requested():
                self._log(f"preemption: signal {self._stop_signal} received; checkpointing step {self.step} and exiting")
                self._preempted = True
                break
            if job.checkpoint.interval and self.step % job.checkpoint.interval == 0:
                self.save_checkpoint()
                saved_at = self.step
        if self.step != saved_at:
            self.save_checkpoint()
        self._report_bubble()
        return losses

    def _mark_preempted(self) -> None:
        """Stopped by a signal with the checkpoint complete: tell the launcher (launch/slurm.sbatch requeues only
        then) through the file ``MOETRAIN_PREEMPTED_FILE`` names, if it names one."""
        path = os.environ.get("MOETRAIN_PREEMPTED_FILE")
        if self.is_main and path:
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                f.write(f"{self.step} {self.run_dir.resolve()}\n")
            os.replace(tmp, path)

    def _report_bubble(self) -> None:
        """The measured idle fraction of every pipeline rank over the run, beside the schedule's formula."""
        if self.pipeline is None:
            return
        p = self.pipeline
        measured = self._bubble_per_rank(p.run_bubble())
        m = self.job.train.global_batch_size // (self.job.train.micro_batch_size * self.dp)
        value, formula = p.spec.bubble_formula(self.mesh.pp, m, p.n_stages // self.mesh.pp)
        expected = f"{formula} = {value:.3f}" if value is not None else formula
        self._log(f"pipeline: {p.spec.name}, pp {self.mesh.pp}, {m} micro-batches: measured bubble per rank "
                  f"{', '.join(f'{b:.3f}' for b in measured)} (schedule's formula: {expected})")

    def _check_finite(self, stats: dict) -> None:
        """Count consecutive non-finite steps (their updates were skipped); stop after train.max_nonfinite_steps."""
        if not stats["skipped"]:
            self._nonfinite_steps = 0
            return
        self._nonfinite_steps += 1
        limit = self.job.train.max_nonfinite_steps
        what = f"loss {stats['loss']}, gradient norm {stats['grad_norm']}"
        if self._nonfinite_steps < limit:
            self._warn(f"step {self.step}: non-finite {what}; update skipped ({self._nonfinite_steps} of "
                       f"train.max_nonfinite_steps={limit} in a row)")
            return
        raise TrainingDiverged(
            f"training diverged at step {self.step}: non-finite {what} for {self._nonfinite_steps} step(s) in a row "
            f"(train.max_nonfinite_steps={limit}); stopped without saving. The checkpoints in {self.ckpt.root} are "
            "from finite steps: resume from one with a lower optim.lr, or raise train.max_nonfinite_steps")

    def train_step(self) -> dict:
        job, step = self.job, self.step
        global_batch = global_batch_at(self.tokens_seen, job.train, self.dp)
        micro_batches = [b.to(self.device) for b in self.loader.next_step(global_batch)]
        self.loader.prefetch(global_batch_at(self.tokens_seen + global_batch * job.train.seq_len, job.train, self.dp))
        # Normalise by the target tokens of the whole global batch, over all ranks.
        n_tokens = all_reduce_sum(torch.tensor(float(sum(b.n_targets for b in micro_batches)), device=self.device),
                                  self.mesh.dp_group)
        lr = lr_at(step, job.optim, job.train.steps)
        set_lr(self.optimizer, lr)
        mtp_lambda = mtp_lambda_at(step, job.train)
        # The losses are global sums over n_tokens and the data-parallel wrappers sum gradients over ranks.
        self._set_balance_loss_scale(job.train.micro_batch_size / global_batch * self.strategy.loss_scale)

        if self.pipeline is not None:
            sums = self._pipeline_step(micro_batches, n_tokens, mtp_lambda, global_batch)
        else:
            sums = self._micro_batches(micro_batches, n_tokens, mtp_lambda, global_batch)
        grad_norm = self._clip_gradients()
        # Every rank has summed its own micro-batches and layers: the totals span the data and pipeline ranks.
        all_reduce_sum(all_reduce_sum(sums, self.mesh.dp_group), self.mesh.pp_group)
        lm, mtp = (sums[0] / n_tokens).item(), (sums[1] / n_tokens).item()
        balance = sums[2].item()
        total = lm + (mtp_lambda * mtp if self.job.model.n_mtp_layers else 0.0)
        # Every rank sees the same global sums and norm, so all skip together.
        skipped = not (math.isfinite(total + balance) and math.isfinite(grad_norm))
        if not skipped:
            self.strategy.step(self.optimizer)
            if self.pipeline is not None:
                self.pipeline.after_step()
        self.strategy.zero_grad(self.optimizer)

        layer_ids, counts_LE = collect_expert_counts(self.model)
        gamma = 0.0 if skipped else bias_update_speed_at(step, job.train)
        # Counts of the whole global batch, so that every rank applies the same bias update.
        counts_LE = all_reduce_sum(counts_LE.to(self.device), self.mesh.dp_group)
        # NOTE: float64, exact past fp32's 2**24 for the counts of many large global batches.
        load_LE = counts_LE.double()
        self._expert_load_LE = load_LE if self._expert_load_LE is None else self._expert_load_LE + load_LE
        maxvio = self._every_layer(layer_ids, update_expert_bias(self.model, gamma, (layer_ids, counts_LE)))
        self.tokens_seen += global_batch * job.train.seq_len
        return {"loss": total + balance, "lm_loss": lm, "mtp_loss": mtp, "balance_loss": balance, "lr": lr,
                "grad_norm": grad_norm, "maxvio": maxvio, "global_batch": global_batch, "mtp_lambda": mtp_lambda,
                "skipped": skipped}

    def _micro_batches(self, micro_batches, n_tokens, mtp_lambda, global_batch) -> torch.Tensor:
        """Forward and backward of each micro-batch; returns this rank's (lm, mtp, balance) loss sums."""
        sums = torch.zeros(3, device=self.device)  # lm, mtp (lambda-free, mean over depths), balance
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last else self.strategy.accumulating(self.module):
                with self._autocast():
                    out = self._forward(mb)
                    loss = out.loss(n_tokens, mtp_lambda)
                self.strategy.backward(loss)
            with torch.no_grad():
                mtp = torch.stack(out.mtp_loss_sums).mean() if out.mtp_loss_sums else torch.zeros((), device=self.device)
                bal = pop_balance_loss(self.model)  # this micro-batch's value per layer
                sums += torch.stack([out.lm_loss_sum.detach(), mtp.detach(),
                                     sum(bal.values(), torch.zeros((), device=self.device))
                                     * mb.tokens.shape[0] / global_batch])
        return sums

    def _pipeline_step(self, micro_batches, n_tokens, mtp_lambda, global_batch) -> torch.Tensor:
        """The step's micro-batches through the pipeline schedule; returns this rank's (lm, mtp, balance) sums:
        the last stage's losses, every stage's balance losses."""
        sums = torch.zeros(3, device=self.device)

        def loss_fn(logits, labels_BT):  # on the last stage, per micro-batch
            out = lm_output(logits, labels_BT)
            if not is_recomputing():  # not the schedule's shape inference
                mtp = torch.stack(out.mtp_loss_sums).mean() if out.mtp_loss_sums else torch.zeros((), device=self.device)
                sums[:2] += torch.stack([out.lm_loss_sum.detach(), mtp.detach()])
            return out.loss(n_tokens, mtp_lambda)

        tokens = torch.cat([mb.tokens for mb in micro_batches])
        with self._autocast():
            self.pipeline.step(tokens, torch.cat([mb.labels for mb in micro_batches]), len(micro_batches), loss_fn,
                               **self._stage_kwargs(micro_batches, tokens))
        bal = pop_balance_loss(self.model)  # every micro-batch's, per layer of this rank's stages
        sums[2] = sum(bal.values(), torch.zeros((), device=self.device)) * micro_batches[0].tokens.shape[0] / global_batch
        return sums

    def _stage_kwargs(self, batches, tokens_BT) -> dict:
        """What every pipeline stage gets besides its input: the tokens (MTP's embeddings) and document masks."""
        kwargs = {"tokens_BT": tokens_BT}
        if self.job.data.document_mask:
            positions = [b.document_positions() for b in batches]
            kwargs.update(doc_ids_BT=torch.cat([d for d, _ in positions]),
                          position_ids_BT=torch.cat([p for _, p in positions]))
        return kwargs

    def _every_layer(self, layer_ids: list[int], values_L: torch.Tensor) -> torch.Tensor:
        """Per-MoE-layer values (rows: this rank's layers, any trailing shape), completed with the other pipeline
        ranks' rows (all layers)."""
        if self.pipeline is None:
            return values_L
        cfg = self.job.model
        all_ids = [i for i in range(cfg.n_layers + cfg.n_mtp_layers) if i >= cfg.moe.first_k_dense_replace]
        full = torch.zeros(len(all_ids), *values_L.shape[1:], dtype=values_L.dtype, device=self.device)
        for layer_id, v in zip(layer_ids, values_L):
            full[all_ids.index(layer_id)] = v
        return all_reduce_sum(full, self.mesh.pp_group).cpu()

    def _expert_bias_abs_mean(self) -> float:
        """Mean over every MoE layer (all pipeline ranks) of the mean |expert bias|."""
        biases = [m.expert_bias.abs().mean() for m in self.model.modules() if hasattr(m, "expert_bias")]
        t = torch.tensor([0.0, float(len(biases))], device=self.device)
        t[0] = sum(biases, torch.zeros((), device=self.device))
        all_reduce_sum(t, self.mesh.pp_group)
        return float(t[0] / t[1]) if t[1] else 0.0

    def _expert_bias_spread(self) -> dict[str, list[float]]:
        """Min, max and standard deviation over experts of each MoE layer's selection bias (all pipeline ranks)."""
        rs = routers(self.model)
        stats_L3 = torch.zeros(0, 3, device=self.device)
        if rs:
            bias_LE = torch.stack([r.expert_bias for r in rs])
            stats_L3 = torch.stack([bias_LE.amin(dim=-1), bias_LE.amax(dim=-1), bias_LE.std(dim=-1, unbiased=False)],
                                   dim=-1)
        # NOTE: a pipeline rank without MoE layers still joins _every_layer's all-reduce, with zero rows.
        stats_L3 = self._every_layer([r.layer_id for r in rs], stats_L3)
        if not len(stats_L3):
            return {}
        return {f"expert_bias_{name}_per_layer": [float(f"{v:.5g}") for v in stats_L3[:, i].tolist()]
                for i, name in enumerate(("min", "max", "std"))}

    def _pop_expert_load(self) -> list[list[int]]:
        """Tokens routed to each expert of each MoE layer (all ranks) over the steps since the last record; the sum
        over a layer's experts is topk times the tokens of those steps."""
        rs, E = routers(self.model), self.job.model.moe.n_routed_experts
        load_LE = self._expert_load_LE
        self._expert_load_LE = None
        load_LE = torch.zeros(len(rs), E, dtype=torch.float64, device=self.device) if load_LE is None else \
            load_LE.reshape(len(rs), E)  # (0, 0) from collect_expert_counts on a rank without MoE layers
        return self._every_layer([r.layer_id for r in rs], load_LE).round().long().tolist()

    def _bubble_per_rank(self, mine: float) -> list[float]:
        """Each pipeline rank's idle fraction, averaged over the data-parallel replicas."""
        t = torch.zeros(self.mesh.pp, device=self.device)
        t[self.mesh.pp_rank] = mine / self.dp
        return all_reduce_sum(all_reduce_sum(t, self.mesh.dp_group), self.mesh.pp_group).tolist()

    def _set_balance_loss_scale(self, scale: float) -> None:
        for m in self.model.modules():
            if isinstance(m, MoE):
                m.balance_loss_scale = scale

    def _clip_gradients(self) -> float:
        self.strategy.finish_gradients(self.model)
        if self.pipeline is None:
            return self.strategy.clip_grad_norm(self.model, self.job.optim.grad_clip)
        self.pipeline.tie_embedding_grads()
        return self.strategy.clip_grad_norm(self.model, self.job.optim.grad_clip, self.pipeline.norm_excluded())

    def _forward(self, batch):
        if self.job.data.document_mask:
            return self.module(batch.tokens, batch.labels, *batch.document_positions())
        return self.module(batch.tokens, batch.labels)

    @torch.no_grad()
    def validate(self) -> float:
        """Mean next-token loss over ``train.val_batches`` fixed global batches of the held-out samples."""
        held_out = [i for i, (lo, hi) in enumerate(self.sources.val_ranges) if hi > lo]
        if not held_out:
            return float("nan")
        blend = Blend([self.sources.val_ranges[i] for i in held_out], [self.sources.weights[i] for i in held_out],
                      seed=0)
        self._set_training(False)
        micro, rank = self.job.train.micro_batch_size, self.mesh.dp_rank
        total, count = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for i in range(self.job.train.val_batches):
            src, sample = blend.lookup_many((i * self.dp + rank) * micro, micro)
            rows = np.concatenate([self.sources.samples[held_out[s]].rows(sample[src == s])
                                   for s in np.unique(src)])
            batch = make_batch(rows, self.loader.eos_id).to(self.device)
            with self._autocast():
                out = self._forward(batch) if self.pipeline is None else self._pipeline_forward(batch)
            if out is not None:
                total += out.lm_loss_sum.float()
                count += out.n_tokens
        self._set_training(True)
        for t in (total, count):
            all_reduce_sum(all_reduce_sum(t, self.mesh.dp_group), self.mesh.pp_group)
        return (total / count.clamp_min(1)).item()

    def _pipeline_forward(self, batch):
        """Forward only through the stages; the loss parts on the last stage's ranks, None elsewhere."""
        logits = self.pipeline.forward_only(batch.tokens, **self._stage_kwargs([batch], batch.tokens))
        return None if logits is None else lm_output(logits, batch.labels)

    def _set_training(self, mode: bool) -> None:
        for module in [self.model] + (self.pipeline.stages if self.pipeline is not None else []):
            module.train(mode)

    def _log_step(self, stats: dict, step_seconds: float) -> None:
        tokens = stats["global_batch"] * self.job.train.seq_len
        tokens_per_s = tokens / step_seconds
        tflops = self.flops_per_token * tokens_per_s / 1e12 / self.dist.world_size  # per device
        maxvio = stats.pop("maxvio")
        record = {k: stats[k] for k in ("loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "grad_norm")}
        record.update(
            tokens_per_s=tokens_per_s, tflops=tflops, mfu=tflops / self.peak if self.peak else None,
            max_violation=float(maxvio.mean()) if maxvio.numel() else 0.0,
            max_violation_per_layer=[round(float(v), 4) for v in maxvio],
            expert_bias_abs_mean=self._expert_bias_abs_mean(), **self._expert_bias_spread(),
            expert_load=self._pop_expert_load(), memory_gb=memory_gb(self.device),
            tokens_seen=self.tokens_seen, global_batch=stats["global_batch"], mtp_lambda=stats["mtp_lambda"])
        if "val_loss" in stats:
            record["val_loss"] = stats["val_loss"]
        if self.pipeline is not None:
            record["pipeline_bubble_per_rank"] = [round(b, 4) for b in self._bubble_per_rank(self.pipeline.pop_bubble())]
        if self.mesh.ep > 1:  # over every token of the steps since the last record, all ranks
            from moetrain.parallel.expert_parallel import pop_dispatch_stats

            stats = pop_dispatch_stats(self.model).to(self.device)
            ranks, tokens, dropped, copies = all_reduce_sum(stats, self.mesh.dp_group).tolist()
            record.update(routing_ranks_per_token=ranks / max(tokens, 1), dropped_fraction=dropped / max(copies, 1))
        self.metrics.log(self.step, record)


# Training choices stored in the model config that do not change the weights.
_NOT_ARCHITECTURE = ("init_std", "max_seq_len", "balance_loss_alpha", "grouped_mm")


def _architecture_mismatch(saved: dict, current, ignore: tuple[str, ...] = ()) -> str | None:
    """The first ``model.*`` key whose value differs between a saved model config and this run's, if any."""
    def differing(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            return [k for key in sorted(set(a) | set(b)) for k in differing(a.get(key), b.get(key), f"{prefix}.{key}")]
        return [] if a == b else [prefix]

    mine = dataclasses.asdict(current)
    for key in differing(saved, mine, "model"):
        if key.split(".")[-1] not in _NOT_ARCHITECTURE and key.split(".")[1] not in ignore:
            return key
    return None


def _data_mismatch(saved: dict, mine: dict) -> tuple[str, object, object] | None:
    """(key, saved value, this run's value) of the first data setting that differs, or None."""
    for key in mine:
        if saved.get(key) != mine[key]:
            return key, saved.get(key), mine[key]
    return None


def _contents_digest(tokens) -> str | None:
    """A prepared dataset's contents, from its manifest's shard checksums (None for in-memory tokens)."""
    manifest = getattr(tokens, "manifest", None)
    if manifest is None:
        return None
    h = hashlib.sha256()
    for shard in manifest.shards:
        h.update(f"{shard.name}:{shard.sha256_bin}:{shard.sha256_idx};".encode())
    return h.hexdigest()[:16]


def _kernels_note(device: torch.device) -> str:
    """On CPU, the kernels torch chose (ATEN_CPU_CAPABILITY) and its threads: they set the summation orders."""
    if device.type != "cpu":
        return ""
    return f" ({torch.backends.cpu.get_cpu_capability()} kernels, {torch.get_num_threads()} thread(s))"


def _entropy_note(entropy: float | None) -> str:
    return "" if entropy is None else f" (unigram entropy {entropy:.3f} nats)"


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())




def run(job: JobConfig) -> list[float]:
    trainer = None
    try:
        trainer = Trainer(job)
        trainer.resume_or_init()
        losses = trainer.fit()
        finish()  # every rank done with its last message before any tears the process group down
        return losses
    finally:
        # The trainer (pipeline stages and their communicators among it) goes before the process group.
        trainer = None
        gc.collect()
        destroy()


register_configs()


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    # Errors are handled here, not around Hydra, which would first print "Error executing job ...".
    try:
        _per_job_run_dir(cfg)
        job = to_job_config(cfg)
    except Exception as e:
        _exit_on_user_error(e, composing=True)
        raise
    try:
        run(job)
    except Exception as e:
        _exit_on_user_error(e, composing=False)
        raise


def _per_job_run_dir(cfg: DictConfig) -> None:
    """In a Hydra sweep (``moetrain train -m a=1,2``) with one run.dir given, each job trains in a folder of it
    named by the job's own overrides (sharing one, a job would resume another's checkpoint; named by position, a
    later sweep with other values would). The default run.dir already differs per job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from moetrain.config import overrides_name

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    overrides = list(HydraConfig.get().overrides.task)
    if any(o.startswith("run.dir=") for o in overrides):
        cfg.run.dir = f"{cfg.run.dir}/{overrides_name(overrides) or 'default'}"


# Exit statuses: 2 = refused before training (config, a busy run.dir), 1 = stopped by an error while running.
_REFUSALS = (ConfigError, RunDirLocked)
_RUN_ERRORS = (CheckpointError, HFFormatError, ShardError, TrainingDiverged)


@record  # under torchrun, a worker's traceback reaches torchrun's failure summary
def main() -> None:
    """``moetrain train``: Hydra's entry, with user errors as one line and an exit status instead of a traceback
    (``HYDRA_FULL_ERROR=1`` shows the traceback)."""
    global _FULL_ERROR
    adopt_slurm_ranks()  # srun, one task per GPU: Slurm's variables stand in for torchrun's
    _quiet_library_warnings()
    _FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # composition errors reach us instead of Hydra's multi-line report
    try:
        _hydra_main()
    except Exception as e:  # Hydra's own composition (overrides, presets) fails before _hydra_main runs
        _exit_on_user_error(e, composing=True)
        raise
    finally:
        if not _FULL_ERROR:
            os.environ.pop("HYDRA_FULL_ERROR", None)


_FULL_ERROR = False


def _quiet_library_warnings() -> None:
    """Library warnings that say nothing to a moetrain user stay off the console (moetrain's own still show)."""
    import warnings

    # DCP in one process (no process group), which is how moetrain runs single-process training on purpose.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)


def _exit_on_user_error(e: Exception, composing: bool) -> None:
    """Print a user error as one line (rank 0 for config errors, the failing rank otherwise) and exit."""
    status, message = _user_error(e, composing)
    if status is None or _FULL_ERROR:
        return
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 or status == 1:  # config errors are the same on every rank; run errors may be one rank's
        prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"moetrain: {prefix}error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def _user_error(e: BaseException, composing: bool) -> tuple[int | None, str]:
    """(exit status, one-line message) of an error the user can act on, or (None, '') for a bug.

    ``composing``: raised while the config was composed and checked, where Hydra's and OmegaConf's errors mean a
    bad override or preset; later they are bugs and keep their traceback.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    for cause in _causes(e):
        if isinstance(cause, _REFUSALS):
            return 2, _one_line(str(cause))
        if isinstance(cause, _RUN_ERRORS):
            return 1, _one_line(str(cause))
    if composing and isinstance(e, (HydraException, OmegaConfBaseException)):
        text = str(e).split("Config search path:")[0].replace(":\n", ": ")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), None)
        cause = e.__cause__
        detail = [ln.strip() for ln in str(cause).splitlines() if ln.strip()][:1] if cause else []
        text = "; ".join(ln for ln in lines + detail if not ln.startswith(("full_key:", "object_type", "reference_type")))
        return 2, _one_line(f"{key}: {text}" if key else text)
    return None, ""


def _causes(e: BaseException):
    """``e`` and what it was raised from; the context of a wrapper too (OmegaConf wraps resolver errors), but not
    of any other error, which may be a bug raised while handling a user error."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    while e is not None:
        yield e
        wrapper = isinstance(e, (HydraException, OmegaConfBaseException)) and not e.__suppress_context__
        e = e.__cause__ or (e.__context__ if wrapper else None)


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    main()
