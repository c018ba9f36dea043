"""Where a run starts: a checkpoint to continue (checkpoint.resume), Hugging Face weights (checkpoint.init_from_hf),
or the initialisation. A checkpoint of another architecture, or of other data, is refused naming the key before
any tensor is read (unless checkpoint.allow_data_change, which continues at the same sample count)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from omegaconf import OmegaConf

from moetrain.model import ConfigError

# Training choices stored in the model config that do not change the weights.
_NOT_ARCHITECTURE = ("init_std", "max_seq_len", "balance_loss_alpha", "grouped_mm", "backend")


def architecture_mismatch(saved: dict, current, ignore: tuple[str, ...] = ()) -> str | None:
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


def data_identity(job, sources) -> dict:
    """What the loader position means: sequence length, order seed, split, and each source's contents."""
    data = job.data
    return {"train.seq_len": job.train.seq_len, "data.seed": data.seed, "data.val_fraction": data.val_fraction,
            "data.paths": [[name, weight, len(samples), _contents_digest(samples.tokens)] for (name, weight),
                           samples in zip(sources.blend_id, sources.samples)]}


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


def start_run(job, ckpt, model, optimizer, strategy, loader, sources, log, warn) -> tuple[int, int]:
    """Continue from checkpoint.resume, else start from checkpoint.init_from_hf, else from the initialisation;
    returns (step, tokens seen), with ``model``, ``optimizer`` and ``loader`` set accordingly."""
    path = ckpt.find_resume(job.checkpoint.resume)
    if path is not None:
        _check_same_model(path, job.model)
        state = ckpt.load(path, model, optimizer)
        if state.get("kind") == "model":
            log(f"checkpoint: {path} holds weights only; training starts at step 0 from them")
            return 0, 0
        loader.load_state_dict(_loader_state(path, state, data_identity(job, sources), loader,
                                             job.checkpoint.allow_data_change, warn))
        log(f"checkpoint: continuing after step {state['step']} ({state['tokens_seen']} tokens seen)")
        return state["step"], state["tokens_seen"]
    if job.checkpoint.init_from_hf:
        _init_from_hf(job.checkpoint.init_from_hf, job, model, optimizer, strategy, log)
    return 0, 0


def _check_same_model(path: Path, model_cfg) -> None:
    """Refuse, naming the key, a checkpoint of another architecture (before any tensor is read)."""
    saved = OmegaConf.to_container(OmegaConf.load(path / "config.yaml").model)
    key = architecture_mismatch(saved, model_cfg)
    if key:
        raise ConfigError(key, f"checkpoint {path} was saved with a different value than this run's; use a "
                               "new run.dir, checkpoint.resume=none, or the checkpoint's model settings")


def _loader_state(path: Path, state: dict, mine: dict, loader, allow_data_change: bool, warn) -> dict:
    """The loader state to continue with. A resume whose data differs from the checkpoint's (the loader position
    would mean other samples) is refused unless checkpoint.allow_data_change; then it continues at the same sample
    count. A checkpoint from before data identities: the loader checks."""
    saved, loader_state = state.get("data"), state["loader"]
    differs = _data_mismatch(saved, mine) if saved is not None else None
    if differs is None:
        return loader_state
    key, was, now = differs
    if not allow_data_change:
        raise ConfigError(key, f"checkpoint {path} was trained with {was}, this run has {now}; the data "
                               "position would select other samples. Restore it, or set "
                               "checkpoint.allow_data_change=true to continue at the same sample count")
    warn(f"checkpoint: {key} changed since {path.name} ({was} -> {now}); continuing at sample "
         f"{loader_state['consumed']} of the new data order (checkpoint.allow_data_change=true)")
    return {**loader_state, "seed": loader.seed, "blend": loader.blend_id}


def _init_from_hf(hf_dir: str, job, model, optimizer, strategy, log) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from moetrain.hf import config_from_hf, from_hf_pretrained, read_json

    hf_cfg = config_from_hf(read_json(Path(hf_dir) / "config.json"))
    # RoPE and the MTP depth may differ: neither changes the shapes of the weights that are loaded.
    key = architecture_mismatch(dataclasses.asdict(hf_cfg), job.model, ignore=("rope", "n_mtp_layers"))
    if key:
        raise ValueError(f"checkpoint.init_from_hf: {hf_dir} has a different {key} than this run; "
                         "choose the matching model preset")
    full = from_hf_pretrained(hf_dir).state_dict()
    missing = [k for k in model.state_dict() if k not in full]
    if any(not k.startswith("mtp.") for k in missing):
        raise ValueError(f"checkpoint.init_from_hf: {hf_dir} lacks {missing[:3]}")
    if missing:
        log(f"checkpoint: {hf_dir} has no MTP weights; the MTP modules start from their initialisation")
    if job.parallel.dp_strategy == "deepspeed":  # ZeRO's fp32 masters must receive the weights too
        strategy.load_state_dict(model, optimizer, {k: v for k, v in full.items() if k in model.state_dict()}, None)
    else:
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
    log(f"checkpoint: initialised from Hugging Face weights in {hf_dir}")
