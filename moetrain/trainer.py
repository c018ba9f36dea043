"""The training loop.

Per optimizer step: the loader hands this rank its micro-batches -> the runner runs forward and backward of each,
the loss normalised by the target tokens of the whole global batch -> gradient clipping -> AdamW -> the
auxiliary-loss-free bias update from the per-expert counts summed over all ranks -> metrics -> validation ->
checkpoint. What differs between layouts lives below this module: the model's parallelisation
(moetrain.parallel.parallelize), how micro-batches run (moetrain.runner), the balance state (moetrain.moe_stats).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from moetrain.checkpoint import CheckpointManager
from moetrain.checkpoint.resume import data_identity, start_run
from moetrain.config import JobConfig
from moetrain.data import Blend, DataLoader, build_sources
from moetrain.data.loader import read_batches
from moetrain.errors import TrainingDiverged
from moetrain.metrics import MetricsLogger, log_text, memory_gb
from moetrain.model.attention import describe_backend
from moetrain.moe_stats import MoEStats
from moetrain.optim import build_optimizer, set_lr
from moetrain.parallel.dist import DistInfo, init_distributed, shared_store_restart_hazard
from moetrain.parallel.mesh import all_reduce_sum, build_mesh
from moetrain.parallel.parallelize import build_strategy, parallelize
from moetrain.plan import peak_tflops, training_flops_per_token
from moetrain.precision import Precision
from moetrain.preemption import StopRequest, mark_preempted
from moetrain.profiling import StepProfiler
from moetrain.run_dir import RunDirOwner
from moetrain.runner import LocalRunner, PipelineRunner
from moetrain.schedules import bias_update_speed_at, global_batch_at, lr_at, mtp_lambda_at


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
        self.dp, self.is_main, self.run_dir = self.mesh.dp, self.dist.is_main, Path(job.run.dir)
        self.run = RunDirOwner(self.run_dir, self.dist.rank, self.dist.world_size, self.device, self.log)
        with self._release_on_error():
            self._setup()

    def _setup(self) -> None:
        job = self.job
        seed_everything(job.train.seed)
        self.precision = Precision(job.precision, self.device, self.warn)
        self.strategy = build_strategy(job, self.mesh, self.precision.compute_dtype, self.device)
        built = parallelize(job, self.mesh, self.precision, self.strategy, self.device, self.log)
        self.model = built.model  # this rank's part: state dicts, balance state, metrics
        module, self.optimizer = self.strategy.wrap(self.model, lambda m: build_optimizer(m, job.optim))
        args = (self.model, module, self.strategy, self.mesh, self.device,
                lambda: self.precision.autocast(self.mesh.dp_group), job.data.document_mask)
        self.runner = PipelineRunner(built.pipeline, *args) if built.pipeline is not None else LocalRunner(*args)
        self.runner.weights_changed()
        self.moe = MoEStats(self.model, job.model, self.device, self.mesh.dp_group, self.mesh.pp_group,
                            self.mesh.ep > 1)
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
                                      self.dist.world_size, self.log, job.checkpoint.async_save, self.strategy)
        self.profiler = StepProfiler(job.train.profile, self.dist.rank, self.run_dir, self.device)
        self.stop = StopRequest()
        self._nonfinite_steps = 0  # consecutive
        entropy = self.sources.unigram_entropy
        self.log(f"moetrain: {job.model.n_layers} layers, {built.n_params / 1e6:.2f}M parameters, "
                 f"{self.dp} data-parallel rank(s){f' (ep {self.mesh.ep})' if self.mesh.ep > 1 else ''}"
                 f"{self.runner.describe()} on {name}{_kernels_note(self.device)}, compute {self.precision}, "
                 f"{sum(r[1] - r[0] for r in self.sources.train_ranges)} training samples of {job.train.seq_len} "
                 f"tokens{'' if entropy is None else f' (unigram entropy {entropy:.3f} nats)'}; run dir {self.run_dir}")
        backend = describe_backend(job.model, self.device, self.precision.compute_dtype, job.train.seq_len,
                                   job.data.document_mask)
        self.log(f"attention: {backend}")
        hazard = shared_store_restart_hazard()
        if hazard:
            self.warn(hazard)

    def _build_sources(self):
        """Local rank 0 prepares (or downloads) shared cached data first; the other ranks then read it."""
        args = (self.job.data, self.job.train.seq_len, self.job.model.vocab_size)
        if self.dist.world_size == 1:
            return build_sources(*args)
        import torch.distributed as dist

        sources = build_sources(*args) if self.dist.local_rank == 0 else None
        dist.barrier()
        return sources if sources is not None else build_sources(*args)

    # ------------------------------------------------------------------------------------ run dir, logs
    @contextlib.contextmanager
    def _release_on_error(self):
        """A refusal or failure before the first step releases (and, if this run made it, removes) run.dir."""
        try:
            yield
        except BaseException as e:
            self.run.rank_log.error(f"stopped before training: {type(e).__name__}: {e}")
            self.close()
            raise

    def close(self) -> None:
        """Release the run directory (``fit`` releases it itself when it ends)."""
        self.run.release()

    def log(self, line: str) -> None:
        log_text(self.run_dir, line, self.is_main)

    def warn(self, message: str) -> None:
        if self.is_main:
            import warnings

            warnings.warn(message, stacklevel=2)
            self.log(f"WARNING: {message}")

    # ------------------------------------------------------------------------------------- checkpoints
    def resume_or_init(self) -> None:
        """Continue from checkpoint.resume, else start from checkpoint.init_from_hf, else from scratch."""
        with self._release_on_error():
            self.step, self.tokens_seen = start_run(self.job, self.ckpt, self.model, self.optimizer, self.strategy,
                                                    self.loader, self.sources, self.log, self.warn)
            self.runner.weights_changed(verify=True)

    def save_checkpoint(self) -> None:
        state = {"kind": "train", "step": self.step, "tokens_seen": self.tokens_seen,
                 "loader": self.loader.state_dict(), "data": data_identity(self.job, self.sources)}
        self.ckpt.save(self.step, self.model, self.optimizer, state, OmegaConf.to_yaml(OmegaConf.structured(self.job)))

    # -------------------------------------------------------------------------------------------- loop
    def fit(self) -> list[float]:
        """Train until train.steps (or train.stop_at); returns the loss of every step run."""
        try:
            self.run.start(OmegaConf.to_yaml(OmegaConf.structured(self.job)))
            losses, preempted = self._fit()
            self.ckpt.wait()  # the last checkpoint is complete before anyone is told so
            if preempted and self.is_main:
                mark_preempted(self.step, self.run_dir)
            return losses
        except BaseException as e:
            self.run.rank_log.error(f"training stopped at step {self.step}: {type(e).__name__}: {e}")
            raise
        finally:
            try:
                self.ckpt.wait()  # a background save of an earlier (finite) step
            finally:
                self.profiler.close()
                self.metrics.close()
                self.close()

    def _fit(self) -> tuple[list[float], bool]:
        job, losses, preempted = self.job, [], False
        last = job.train.steps if job.train.stop_at < 0 else min(job.train.stop_at, job.train.steps)
        self.stop.install()
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
                self.run.rank_log.info(message)
                self.log(message)
            losses.append(stats["loss"])
            validate = bool(job.train.val_interval) and self.step % job.train.val_interval == 0
            if validate:
                stats["val_loss"] = self.validate()
            if self.step % job.logging.interval == 0 or self.step == last or validate or stats["skipped"]:
                self.log_step(stats, step_seconds)
            self._check_finite(stats)
            if stats["stop"]:
                self.log(f"preemption: signal {self.stop.signum} received; checkpointing step {self.step} and exiting")
                preempted = True
                break
            if job.checkpoint.interval and self.step % job.checkpoint.interval == 0:
                self.save_checkpoint()
                saved_at = self.step
        if self.step != saved_at:
            self.save_checkpoint()
        report = self.runner.report(job.train.global_batch_size // (job.train.micro_batch_size * self.dp))
        if report:
            self.log(report)
        return losses, preempted

    def _check_finite(self, stats: dict) -> None:
        """Count consecutive non-finite steps (their updates were skipped); stop after train.max_nonfinite_steps."""
        if not stats["skipped"]:
            self._nonfinite_steps = 0
            return
        self._nonfinite_steps += 1
        limit = self.job.train.max_nonfinite_steps
        what = f"loss {stats['loss']}, gradient norm {stats['grad_norm']}"
        if self._nonfinite_steps < limit:
            self.warn(f"step {self.step}: non-finite {what}; update skipped ({self._nonfinite_steps} of "
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
        sums = self.runner.forward_backward(micro_batches, n_tokens, mtp_lambda, global_batch)
        grad_norm = self.runner.clip_gradients(job.optim.grad_clip)
        # Every rank has summed its own micro-batches and layers: the totals span the data and pipeline ranks. A
        # stop signal on any rank makes the count positive: every rank stops after the same step.
        stop = torch.tensor([float(self.stop.signum is not None)], device=self.device)
        sums = all_reduce_sum(all_reduce_sum(torch.cat([sums, stop]), self.mesh.dp_group), self.mesh.pp_group)
        # NOTE: the step's one host read (the loss parts, the norm and the stop count, one transfer): the decision
        # to skip a non-finite step needs them before the optimizer runs.
        # (DeepSpeed's norm is on the CPU when it offloads the optimizer.) A signal that arrives after this read
        # stops the run after the next step.
        lm, mtp, balance, stops, grad_norm = torch.cat([sums[:2] / n_tokens, sums[2:],
                                                        grad_norm.view(1).to(self.device)]).tolist()
        total = lm + (mtp_lambda * mtp if job.model.n_mtp_layers else 0.0)
        # Every rank sees the same global sums and norm, so all skip together.
        skipped = not (math.isfinite(total + balance) and math.isfinite(grad_norm))
        if not skipped:
            self.strategy.step(self.optimizer)
            self.runner.weights_changed()
        self.strategy.zero_grad(self.optimizer)
        self.moe.update(0.0 if skipped else bias_update_speed_at(step, job.train))
        self.tokens_seen += global_batch * job.train.seq_len
        return {"loss": total + balance, "lm_loss": lm, "mtp_loss": mtp, "balance_loss": balance, "lr": lr,
                "grad_norm": grad_norm, "global_batch": global_batch, "mtp_lambda": mtp_lambda, "skipped": skipped,
                "stop": stops > 0}

    @torch.no_grad()
    def validate(self) -> float:
        """Mean next-token loss over ``train.val_batches`` fixed global batches of the held-out samples."""
        held_out = [i for i, (lo, hi) in enumerate(self.sources.val_ranges) if hi > lo]
        if not held_out:
            return float("nan")
        blend = Blend([self.sources.val_ranges[i] for i in held_out], [self.sources.weights[i] for i in held_out],
                      seed=0)
        sources = [self.sources.samples[i] for i in held_out]
        self.runner.set_training(False)
        micro, rank = self.job.train.micro_batch_size, self.mesh.dp_rank
        total, count = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for i in range(self.job.train.val_batches):
            (batch,) = read_batches(sources, blend, (i * self.dp + rank) * micro, micro, micro)
            out = self.runner.evaluate(batch.to(self.device))
            if out is not None:  # a pipeline rank without the last stage computes no loss
                total += out.lm_loss_sum.float()
                count += out.n_tokens
        self.runner.set_training(True)
        totals = all_reduce_sum(all_reduce_sum(torch.stack([total, count]), self.mesh.dp_group), self.mesh.pp_group)
        return (totals[0] / totals[1].clamp_min(1)).item()

    def log_step(self, stats: dict, step_seconds: float) -> None:
        """The metrics record of a step (the stats train_step returned): a constant number of host reads, whatever
        the number of layers."""
        tokens_per_s = stats["global_batch"] * self.job.train.seq_len / step_seconds
        tflops = self.flops_per_token * tokens_per_s / 1e12 / self.dist.world_size  # per device
        record = {k: stats[k] for k in ("loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "grad_norm")}
        record.update(tokens_per_s=tokens_per_s, tflops=tflops, mfu=tflops / self.peak if self.peak else None,
                      **self.moe.record(), memory_gb=memory_gb(self.device), tokens_seen=self.tokens_seen,
                      global_batch=stats["global_batch"], mtp_lambda=stats["mtp_lambda"], **self.runner.record())
        if "val_loss" in stats:
            record["val_loss"] = stats["val_loss"]
        self.metrics.log(self.step, record)


def _kernels_note(device: torch.device) -> str:
    """On CPU, the kernels torch chose (ATEN_CPU_CAPABILITY) and its threads: they set the summation orders."""
    if device.type != "cpu":
        return ""
    return f" ({torch.backends.cpu.get_cpu_capability()} kernels, {torch.get_num_threads()} thread(s))"
