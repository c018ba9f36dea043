"""The training program: ``moetrain train [overrides]`` or ``python -m moetrain.train [overrides]``.

Flow per optimizer step: the loader hands this rank its micro-batches -> forward/backward of each, the loss
normalised by the target tokens of the whole global batch -> gradient clipping -> AdamW -> the auxiliary-loss-free
bias update from the per-expert counts summed over all ranks -> metrics -> validation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import signal
import threading
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from moetrain.checkpoint import CheckpointManager
from moetrain.config import JobConfig, register_configs, to_job_config
from moetrain.data import Blend, DataLoader, build_sources, make_batch
from moetrain.metrics import MetricsLogger, log_text, memory_gb
from moetrain.model import build_model, collect_expert_counts, init_weights, update_expert_bias
from moetrain.model.balance import collect_balance_loss
from moetrain.model.moe import MoE
from moetrain.optim import build_optimizer, set_lr
from moetrain.parallel.dist import DistInfo, all_reduce_sum, destroy, init_distributed
from moetrain.parallel.recompute import apply_recompute
from moetrain.plan import peak_tflops, training_flops_per_token
from moetrain.resources import conf_dir
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
        self.dp = job.parallel.data_parallel_size(self.dist.world_size)
        self.run_dir = Path(job.run.dir)
        self.is_main = self.dist.is_main
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(OmegaConf.structured(job), self.run_dir / "config.yaml")
        seed_everything(job.train.seed)
        self.compute_dtype = self._compute_dtype()

        self.model = self._build_model()
        self.optimizer = build_optimizer(self.model, job.optim)
        self.sources = self._build_sources()
        self.loader = DataLoader(self.sources.samples, self.sources.train_ranges, self.sources.weights, job.data.seed,
                                 self.dist.rank % self.dp, self.dp, job.train.micro_batch_size,
                                 self.sources.blend_id, job.data.prefetch)
        self.step, self.tokens_seen = 0, 0
        self.flops_per_token = training_flops_per_token(job.model, job.train.seq_len)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.peak = job.logging.peak_tflops or peak_tflops(name)
        self.metrics = MetricsLogger(job.logging, self.run_dir, job.train.steps, self.is_main,
                                     OmegaConf.to_container(OmegaConf.structured(job)))
        self.ckpt = CheckpointManager(job.checkpoint.dir, job.checkpoint.keep_last, self.dist.rank,
                                      self.dist.world_size, self._log, job.checkpoint.async_save)
        self._stop_signal: int | None = None
        self._log(f"moetrain: {self.job.model.n_layers} layers, {_count(self.model) / 1e6:.2f}M parameters, "
                  f"{self.dp} data-parallel rank(s) on {name}, compute {self.compute_dtype}, "
                  f"{sum(r[1] - r[0] for r in self.sources.train_ranges)} training samples of {job.train.seq_len} "
                  f"tokens{_entropy_note(self.sources.unigram_entropy)}; run dir {self.run_dir}")

    # ------------------------------------------------------------------------------------------- checkpoints
    def resume_or_init(self) -> None:
        """Continue from checkpoint.resume, else start from checkpoint.init_from_hf, else from scratch."""
        path = self.ckpt.find_resume(self.job.checkpoint.resume)
        if path is not None:
            self._check_same_model(path)
            state = self.ckpt.load(path, self.model, self.optimizer)
            if state.get("kind") == "model":
                self._log(f"checkpoint: {path} holds weights only; training starts at step 0 from them")
                return
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.loader.load_state_dict(state["loader"])
            self._log(f"checkpoint: continuing after step {self.step} ({self.tokens_seen} tokens seen)")
        elif self.job.checkpoint.init_from_hf:
            self._init_from_hf(self.job.checkpoint.init_from_hf)

    def _check_same_model(self, path: Path) -> None:
        """Refuse, naming the key, a checkpoint of another architecture (before any tensor is read)."""
        saved = OmegaConf.to_container(OmegaConf.load(path / "config.yaml").model)
        key = _architecture_mismatch(saved, self.job.model)
        if key:
            raise ValueError(f"checkpoint.resume: {path} was saved with a different {key} than this run; "
                             "use a new run.dir, checkpoint.resume=none, or the checkpoint's model settings")

    def _init_from_hf(self, hf_dir: str) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from moetrain.hf import config_from_hf, from_hf_pretrained

        hf_cfg = config_from_hf(json.loads((Path(hf_dir) / "config.json").read_text()))
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
        set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True, strict=False))
        self._log(f"checkpoint: initialised from Hugging Face weights in {hf_dir}")

    def save_checkpoint(self) -> None:
        state = {"kind": "train", "step": self.step, "tokens_seen": self.tokens_seen,
                 "loader": self.loader.state_dict()}
        self.ckpt.save(self.step, self.model, self.optimizer, state,
                       OmegaConf.to_yaml(OmegaConf.structured(self.job)))

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
    def _compute_dtype(self) -> torch.dtype:
        choice = self.job.precision.dtype
        if choice == "auto":
            choice = "bf16" if self.device.type == "cuda" else "fp32"
        return torch.bfloat16 if choice == "bf16" else torch.float32

    def _build_model(self):
        job = self.job
        model = build_model(job.model, "meta")
        apply_recompute(model, job.train.recompute)
        if self.dp > 1:
            from moetrain.parallel.data_parallel import apply_fsdp

            apply_fsdp(model, self.dp, self.device)
        model.to_empty(device=self.device)
        init_weights(model, job.train.seed)
        if job.train.compile:
            for block in list(model.layers.values()) + [m.block for m in model.mtp.values()]:
                block.compile()
        return model.train()

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
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _log(self, line: str) -> None:
        log_text(self.run_dir, line, self.is_main)

    # ------------------------------------------------------------------------------------------------ loop
    def fit(self) -> list[float]:
        """Train until train.steps (or train.stop_at); returns the loss of every step run."""
        job, losses = self.job, []
        last = job.train.steps if job.train.stop_at < 0 else min(job.train.stop_at, job.train.steps)
        self._install_signal_handlers()
        self.metrics.begin(self.step)
        saved_at = self.step
        while self.step < last:
            self.step += 1
            t0 = time.perf_counter()
            stats = self.train_step()
            step_seconds = time.perf_counter() - t0
            losses.append(stats["loss"])
            validate = bool(job.train.val_interval) and self.step % job.train.val_interval == 0
            if validate:
                stats["val_loss"] = self.validate()
            if self.step % job.logging.interval == 0 or self.step == last or validate:
                self._log_step(stats, step_seconds)
            if self._stop_requested():
                self._log(f"preemption: signal {self._stop_signal} received; checkpointing step {self.step} and exiting")
                break
            if job.checkpoint.interval and self.step % job.checkpoint.interval == 0:
                self.save_checkpoint()
                saved_at = self.step
        if self.step != saved_at:
            self.save_checkpoint()
        self.ckpt.wait()
        self.metrics.close()
        return losses

    def train_step(self) -> dict:
        job, step = self.job, self.step
        global_batch = global_batch_at(self.tokens_seen, job.train, self.dp)
        micro_batches = [b.to(self.device) for b in self.loader.next_step(global_batch)]
        self.loader.prefetch(global_batch_at(self.tokens_seen + global_batch * job.train.seq_len, job.train, self.dp))
        # Normalise by the target tokens of the whole global batch, over all ranks.
        n_tokens = all_reduce_sum(torch.tensor(float(sum(b.n_targets for b in micro_batches)), device=self.device))
        lr = lr_at(step, job.optim, job.train.steps)
        set_lr(self.optimizer, lr)
        mtp_lambda = mtp_lambda_at(step, job.train)
        # FSDP averages gradients over ranks; the losses here are already global sums, so undo the average.
        grad_scale = float(self.dp)
        self._set_balance_loss_scale(job.train.micro_batch_size / global_batch * grad_scale)

        sums = torch.zeros(3, device=self.device)  # lm, mtp (lambda-free, mean over depths), balance
        for mb in micro_batches:
            with self._autocast():
                out = self._forward(mb)
                loss = out.loss(n_tokens, mtp_lambda)
            (loss * grad_scale).backward()
            with torch.no_grad():
                mtp = torch.stack(out.mtp_loss_sums).mean() if out.mtp_loss_sums else torch.zeros((), device=self.device)
                bal = collect_balance_loss(self.model)
                sums += torch.stack([out.lm_loss_sum.detach(), mtp.detach(),
                                     (bal if bal is not None else torch.zeros((), device=self.device))
                                     * mb.tokens.shape[0] / global_batch])
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        counts = all_reduce_sum(collect_expert_counts(self.model).to(self.device))
        maxvio = update_expert_bias(self.model, bias_update_speed_at(step, job.train), counts)
        self.tokens_seen += global_batch * job.train.seq_len

        all_reduce_sum(sums)
        lm, mtp = (sums[0] / n_tokens).item(), (sums[1] / n_tokens).item()
        balance = sums[2].item()
        total = lm + (mtp_lambda * mtp if self.job.model.n_mtp_layers else 0.0)
        return {"loss": total + balance, "lm_loss": lm, "mtp_loss": mtp, "balance_loss": balance, "lr": lr,
                "grad_norm": grad_norm, "maxvio": maxvio, "global_batch": global_batch, "mtp_lambda": mtp_lambda}

    def _set_balance_loss_scale(self, scale: float) -> None:
        for m in self.model.modules():
            if isinstance(m, MoE):
                m.balance_loss_scale = scale

    def _clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.job.optim.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def _forward(self, batch):
        if self.job.data.document_mask:
            return self.model(batch.tokens, batch.labels, *batch.document_positions())
        return self.model(batch.tokens, batch.labels)

    @torch.no_grad()
    def validate(self) -> float:
        """Mean next-token loss over ``train.val_batches`` fixed global batches of the held-out samples."""
        held_out = [i for i, (lo, hi) in enumerate(self.sources.val_ranges) if hi > lo]
        if not held_out:
            return float("nan")
        blend = Blend([self.sources.val_ranges[i] for i in held_out], [self.sources.weights[i] for i in held_out],
                      seed=0)
        self.model.eval()
        micro, rank = self.job.train.micro_batch_size, self.dist.rank % self.dp
        total, count = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for i in range(self.job.train.val_batches):
            src, sample = blend.lookup_many((i * self.dp + rank) * micro, micro)
            rows = np.concatenate([self.sources.samples[held_out[s]].rows(sample[src == s])
                                   for s in np.unique(src)])
            batch = make_batch(rows, self.loader.eos_id).to(self.device)
            with self._autocast():
                out = self._forward(batch)
            total += out.lm_loss_sum.float()
            count += out.n_tokens
        self.model.train()
        all_reduce_sum(total), all_reduce_sum(count)
        return (total / count.clamp_min(1)).item()

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
            expert_bias_abs_mean=_expert_bias_abs_mean(self.model), memory_gb=memory_gb(self.device),
            tokens_seen=self.tokens_seen, global_batch=stats["global_batch"], mtp_lambda=stats["mtp_lambda"])
        if "val_loss" in stats:
            record["val_loss"] = stats["val_loss"]
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


def _entropy_note(entropy: float | None) -> str:
    return "" if entropy is None else f" (unigram entropy {entropy:.3f} nats)"


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _expert_bias_abs_mean(model) -> float:
    biases = [m.expert_bias.abs().mean() for m in model.modules() if hasattr(m, "expert_bias")]
    return float(torch.stack(biases).mean()) if biases else 0.0


def run(job: JobConfig) -> list[float]:
    trainer = Trainer(job)
    trainer.resume_or_init()
    try:
        return trainer.fit()
    finally:
        destroy()


register_configs()


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(to_job_config(cfg))


if __name__ == "__main__":
    main()
