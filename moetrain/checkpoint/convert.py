"""``moetrain convert``: moetrain checkpoints to and from the Hugging Face DeepSeek-V3 format.

    moetrain convert --to-hf CKPT OUT      CKPT: a checkpoint directory, or a checkpoint.dir (its newest complete)
    moetrain convert --from-hf DIR OUT     OUT: a new model-only moetrain checkpoint directory

``--to-hf`` writes config.json and sharded safetensors with an index, HF names, ``e_score_correction_bias`` and
the MTP modules as layers after the main ones; ``DeepseekV3ForCausalLM.from_pretrained(OUT)`` loads it.
``--from-hf`` also reads DeepSeek's released FP8 weights (``weight_scale_inv`` per 128x128 block) and stores them
dequantised in bf16.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from moetrain.checkpoint.manager import (CheckpointError, load_model_weights, resolve_checkpoint, safe_reader,
                                         save_model_checkpoint)
from moetrain.config import JobConfig
from moetrain.hf import (HFFormatError, SafetensorsDir, cast_parameters, config_to_hf, from_hf_pretrained,
                         to_hf_state_dict)
from moetrain.model import ModelConfig, build_model, init_weights


def model_config_of(ckpt: Path) -> ModelConfig:
    raw = OmegaConf.load(ckpt / "config.yaml")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), raw.model)
    return OmegaConf.to_object(merged).validate()


def load_checkpoint_model(ckpt: Path):
    """A full single-process model holding the checkpoint's weights, each in the dtype it was saved in."""
    model = build_model(model_config_of(ckpt), "meta").to_empty(device="cpu")
    init_weights(model)  # buffers; every parameter is then overwritten
    stored = safe_reader(ckpt).read_metadata().state_dict_metadata
    for name, p in model.named_parameters():
        p.data = p.data.to(stored[f"model.{name}"].properties.dtype)
    load_model_weights(ckpt, model)
    return model.eval()


def write_hf(model, out: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """config.json + model-0000k-of-0000n.safetensors + model.safetensors.index.json."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = config_to_hf(model.cfg)
    config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=1))


def _source_dtype(hf_dir: Path) -> torch.dtype:
    """The dtype the HF weights are stored in; a checkpoint with FP8 weights (DeepSeek's release) becomes bf16."""
    ckpt = SafetensorsDir(hf_dir)
    if any(name.endswith("weight_scale_inv") for name in ckpt.weight_map):
        return torch.bfloat16
    return ckpt.get("model.embed_tokens.weight").dtype


def from_hf(hf_dir: Path, out: Path) -> None:
    dtype = _source_dtype(hf_dir)
    model = from_hf_pretrained(hf_dir, dtype=torch.float32)
    cast_parameters(model, dtype)
    job = JobConfig(model=model.cfg)
    save_model_checkpoint(out, model, OmegaConf.to_yaml(OmegaConf.structured(job)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moetrain convert", description=__doc__.split("\n\n")[0])
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--to-hf", nargs=2, metavar=("CKPT", "OUT"))
    group.add_argument("--from-hf", nargs=2, metavar=("DIR", "OUT"))
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    args = p.parse_args(argv)
    try:
        if args.to_hf:
            ckpt = resolve_checkpoint(args.to_hf[0], warn=lambda m: print(f"WARNING: {m}", file=sys.stderr))
            write_hf(load_checkpoint_model(ckpt), Path(args.to_hf[1]), int(args.max_shard_gb * 2**30))
            print(f"convert: {ckpt} -> {args.to_hf[1]} (Hugging Face DeepSeek-V3 format)")
        else:
            from_hf(Path(args.from_hf[0]), Path(args.from_hf[1]))
            print(f"convert: {args.from_hf[0]} -> {args.from_hf[1]} (moetrain checkpoint)")
    except (CheckpointError, HFFormatError, OSError) as e:
        # Bad input, not a bug: one line naming the file, exit status 2 (as for a bad command line).
        print(f"moetrain convert: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
