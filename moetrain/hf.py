"""Hugging Face DeepSeek-V2/V3 format: config and weight names, import and export.

The on-disk layout is what ``transformers``' ``DeepseekV3ForCausalLM.save_pretrained`` writes (and DeepSeek
released): ``model.layers.{i}.mlp.experts.{e}.gate_proj.weight`` per expert, ``e_score_correction_bias`` for the
selection bias, and MTP module k stored as layer ``num_hidden_layers + k`` with ``enorm``, ``hnorm``, ``eh_proj``,
``shared_head.norm`` (its ``embed_tokens`` / ``shared_head.head`` copies equal the main model's and are shared).
DeepSeek's released FP8 weights (``weight_scale_inv``, one fp32 scale per 128x128 block) are dequantised on read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from moetrain.model.config import MLAConfig, ModelConfig, MoEConfig, RopeConfig, RouterConfig
from moetrain.model.init import build_model, init_weights
from moetrain.model.transformer import Transformer
from moetrain.precision.blockwise import dequantize_blocks

# moetrain name inside a block -> HF name inside ``model.layers.{i}``.
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.expert_bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
# Stacked routed-expert tensors [E, ...] -> one HF tensor per expert.
_EXPERT_NAMES = {"ffn.experts.w1": "gate_proj", "ffn.experts.w3": "up_proj", "ffn.experts.w2": "down_proj"}
_MTP_NAMES = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
              "norm.weight": "shared_head.norm.weight"}
_TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "head.weight": "lm_head.weight"}


# ----------------------------------------------------------------------------------------------------- config
def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a HF ``config.json`` dict (deepseek_v3, or deepseek_v2 with softmax routing)."""
    model_type = hf.get("model_type", "deepseek_v3")
    if model_type not in ("deepseek_v3", "deepseek_v2"):
        raise ValueError(f"config.json: model_type {model_type!r} is not deepseek_v3 or deepseek_v2")
    if not hf.get("rope_interleave", True):
        raise ValueError("config.json: rope_interleave=false is not supported (DeepSeek weights are interleaved)")
    topk_method = hf.get("topk_method", "noaux_tc" if model_type == "deepseek_v3" else "greedy")
    grouped = topk_method in ("noaux_tc", "group_limited_greedy")
    router = RouterConfig(
        scoring_func=hf.get("scoring_func", "sigmoid" if model_type == "deepseek_v3" else "softmax"),
        topk=hf["num_experts_per_tok"],
        n_group=(hf.get("n_group") or 1) if grouped else 1,
        topk_group=(hf.get("topk_group") or 1) if grouped else 1,
        norm_topk_prob=bool(hf.get("norm_topk_prob", model_type == "deepseek_v3")),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        selection_bias=topk_method == "noaux_tc",
        balance_loss_alpha=float(hf.get("aux_loss_alpha", 0.0001)),
    )
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], inter_dim=hf["intermediate_size"],
        n_layers=hf["num_hidden_layers"], n_mtp_layers=hf.get("num_nextn_predict_layers", 0) or 0,
        max_seq_len=hf.get("max_position_embeddings", 4096), norm_eps=hf.get("rms_norm_eps", 1e-6),
        init_std=hf.get("initializer_range", 0.006),
        attn=MLAConfig(n_heads=hf["num_attention_heads"], q_lora_rank=hf.get("q_lora_rank") or 0,
                       kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
                       qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"]),
        rope=_rope_from_hf(hf),
        moe=MoEConfig(n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf.get("n_shared_experts") or 0,
                      moe_inter_dim=hf["moe_intermediate_size"],
                      first_k_dense_replace=hf.get("first_k_dense_replace", 0), router=router),
    ).validate()


def _rope_from_hf(hf: dict) -> RopeConfig:
    # transformers >= 5 writes rope_parameters; DeepSeek's release and older transformers write rope_scaling.
    params = dict(hf.get("rope_parameters") or {})
    params.update(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return RopeConfig(rope_theta=theta)
    if kind != "yarn":
        raise ValueError(f"config.json: rope type {kind!r} is not supported (default or yarn)")
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or hf.get("max_position_embeddings", original) / original
    return RopeConfig(rope_theta=theta, scaling="yarn", factor=float(factor),
                      original_max_position_embeddings=original, beta_fast=params.get("beta_fast") or 32.0,
                      beta_slow=params.get("beta_slow") or 1.0, mscale=params.get("mscale") or 0.0,
                      mscale_all_dim=params.get("mscale_all_dim") or 0.0)


def config_to_hf(cfg: ModelConfig) -> dict:
    """A ``config.json`` dict that ``DeepseekV3ForCausalLM`` loads."""
    r = cfg.moe.router
    rope = {"rope_theta": cfg.rope.rope_theta, "rope_type": "default"}
    if cfg.rope.scaling == "yarn":
        rope.update(rope_type="yarn", factor=cfg.rope.factor, beta_fast=cfg.rope.beta_fast,
                    beta_slow=cfg.rope.beta_slow, mscale=cfg.rope.mscale, mscale_all_dim=cfg.rope.mscale_all_dim,
                    original_max_position_embeddings=cfg.rope.original_max_position_embeddings)
    if r.scoring_func != "sigmoid" or not r.selection_bias:
        raise ValueError("model.moe.router: the HF DeepSeek-V3 format needs scoring_func=sigmoid, selection_bias=true")
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": cfg.moe.moe_inter_dim, "num_hidden_layers": cfg.n_layers,
        "num_nextn_predict_layers": cfg.n_mtp_layers, "num_attention_heads": cfg.attn.n_heads,
        "num_key_value_heads": cfg.attn.n_heads, "n_shared_experts": cfg.moe.n_shared_experts,
        "n_routed_experts": cfg.moe.n_routed_experts, "routed_scaling_factor": r.routed_scaling_factor,
        "kv_lora_rank": cfg.attn.kv_lora_rank, "q_lora_rank": cfg.attn.q_lora_rank or None,
        "qk_rope_head_dim": cfg.attn.qk_rope_head_dim, "qk_nope_head_dim": cfg.attn.qk_nope_head_dim,
        "v_head_dim": cfg.attn.v_head_dim, "n_group": r.n_group, "topk_group": r.topk_group,
        "num_experts_per_tok": r.topk, "first_k_dense_replace": cfg.moe.first_k_dense_replace,
        "norm_topk_prob": r.norm_topk_prob, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": False, "rope_parameters": rope,
        "rope_interleave": True, "attention_bias": False, "torch_dtype": "float32",
    }


# ------------------------------------------------------------------------------------------------------ names
def hf_names(cfg: ModelConfig) -> Iterator[tuple[str, str | list[str]]]:
    """(moetrain name, HF name) for every tensor; a stacked expert tensor maps to its per-expert HF names."""
    yield from _TOP_NAMES.items()
    blocks = [(f"layers.{i}.", f"model.layers.{i}.", i) for i in range(cfg.n_layers)]
    blocks += [(f"mtp.{k}.block.", f"model.layers.{cfg.n_layers + k}.", cfg.n_layers + k)
               for k in range(cfg.n_mtp_layers)]
    for ours, theirs, layer in blocks:
        is_dense = layer < cfg.moe.first_k_dense_replace
        for o, t in _BLOCK_NAMES.items():
            if _block_has(o, cfg, is_dense):
                yield ours + o, theirs + t
        if not is_dense:
            for o, t in _EXPERT_NAMES.items():
                yield ours + o, [f"{theirs}mlp.experts.{e}.{t}.weight" for e in range(cfg.moe.n_routed_experts)]
    for k in range(cfg.n_mtp_layers):
        for o, t in _MTP_NAMES.items():
            yield f"mtp.{k}.{o}", f"model.layers.{cfg.n_layers + k}.{t}"


def _block_has(name: str, cfg: ModelConfig, is_dense: bool) -> bool:
    """Whether a block of this config has the tensor ``name`` (a key of ``_BLOCK_NAMES``)."""
    part = name.split(".")[1]
    if name.startswith("attn."):
        return (part == "wq") == (cfg.attn.q_lora_rank == 0) or part not in ("wq", "wq_a", "q_norm", "wq_b")
    if name.startswith("ffn."):
        if is_dense:
            return part in ("w1", "w2", "w3")
        return part == "gate" or (part == "shared_experts" and cfg.moe.n_shared_experts > 0)
    return True


# ----------------------------------------------------------------------------------------------------- import
class HFFormatError(ValueError):
    """A Hugging Face checkpoint directory that cannot be read; the message names the file and what is wrong."""


def read_json(f: Path) -> dict:
    try:
        data = json.loads(f.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFFormatError(f"{f}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise HFFormatError(f"{f}: not a JSON object")
    return data


def _read_weight_map(index: Path) -> dict[str, str]:
    """The index's tensor name -> shard file name, each shard a plain file name inside the index's directory."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise HFFormatError(f"{index}: no \"weight_map\" object mapping tensor names to shard file names")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise HFFormatError(f"{index}: weight_map names {shard!r}, not a file name inside {index.parent}")
    return weight_map


def _open_shard(f: Path, named_by: str):
    from safetensors import safe_open

    if not f.is_file():
        raise HFFormatError(f"{f} is missing ({named_by})" if named_by else f"{f} is missing")
    try:
        return safe_open(f, "pt")
    except Exception as e:  # safetensors' own error type, for a header that does not parse
        raise HFFormatError(f"{f} is not a safetensors file ({e})") from e


class SafetensorsDir:
    """Lazy reader of a HF checkpoint directory (single file or sharded with an index)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            self.weight_map = _read_weight_map(index)
            self._handles = {f: _open_shard(self.path / f, f"named in {index.name}'s weight_map")
                             for f in sorted(set(self.weight_map.values()))}
            return
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.path}: no *.safetensors files and no model.safetensors.index.json")
        self._handles = {f.name: _open_shard(f, "") for f in files}
        self.weight_map = {k: name for name, h in self._handles.items() for k in h.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        """The tensor, dequantised to fp32 when it is FP8 with a ``weight_scale_inv`` beside it."""
        if name not in self.weight_map:
            raise KeyError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        t = self._handles[self.weight_map[name]].get_tensor(name)
        scale_name = name.removesuffix(".weight") + ".weight_scale_inv"
        if scale_name in self.weight_map:
            t = dequantize_blocks(t, self._handles[self.weight_map[scale_name]].get_tensor(scale_name))
        return t


@torch.no_grad()
def load_hf_weights(model: Transformer, ckpt: SafetensorsDir) -> None:
    """Copy every tensor of ``model`` from the HF checkpoint; any missing one is an error naming it."""
    state = model.state_dict()
    names = dict(hf_names(model.cfg))
    unmapped = sorted(set(state) - set(names))
    if unmapped:
        raise KeyError(f"moetrain tensors without a Hugging Face name: {unmapped[:5]}")
    for ours, theirs in names.items():
        if isinstance(theirs, str) and theirs not in ckpt and ours.endswith("expert_bias") \
                and not model.cfg.moe.router.selection_bias:
            continue  # V2-style routers have no selection bias; it stays zero
        if isinstance(theirs, list):
            t = _read_experts(ckpt, ours, theirs)
        else:
            t = ckpt.get(theirs)
        if t.shape != state[ours].shape:
            raise ValueError(f"{ckpt.path}: {theirs if isinstance(theirs, str) else theirs[0]} has shape "
                             f"{tuple(t.shape)}, moetrain expects {tuple(state[ours].shape)} for {ours}")
        state[ours].copy_(t)


def _read_experts(ckpt: SafetensorsDir, ours: str, hf_names_per_expert: list[str]) -> torch.Tensor:
    """Stack per-expert tensors; transformers' in-memory layout (``mlp.experts.gate_up_proj`` [E, 2F, D],
    ``mlp.experts.down_proj`` [E, D, F]) is read as well."""
    prefix = hf_names_per_expert[0].split("mlp.experts.")[0] + "mlp.experts."
    if prefix + "down_proj" not in ckpt:
        return torch.stack([ckpt.get(n) for n in hf_names_per_expert])
    if ours.endswith("w2"):
        return ckpt.get(prefix + "down_proj")
    gate_up = ckpt.get(prefix + "gate_up_proj")
    half = gate_up.shape[1] // 2
    return gate_up[:, :half] if ours.endswith("w1") else gate_up[:, half:]


def from_hf_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> Transformer:
    """A moetrain model (eval mode) from a directory written by ``DeepseekV3ForCausalLM.save_pretrained``."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: not a Hugging Face model directory")
    cfg = config_from_hf(read_json(config_file))
    ckpt = SafetensorsDir(path)
    if cfg.n_mtp_layers and f"model.layers.{cfg.n_layers}.eh_proj.weight" not in ckpt:
        cfg.n_mtp_layers = 0  # transformers does not save MTP layers; DeepSeek's release does
    model = build_model(cfg, "meta").to_empty(device=device)
    init_weights(model)  # norms, buffers, RoPE; every parameter is then overwritten from the checkpoint
    load_hf_weights(model, ckpt)
    cast_parameters(model, dtype)
    return model.eval()


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters only: the fp32 router biases and complex RoPE table stay as they are."""
    for p in model.parameters():
        p.data = p.data.to(dtype)


# ----------------------------------------------------------------------------------------------------- export
def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """HF-named tensors (per-expert, MTP layers after the main ones with their shared embedding/head copies)."""
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in hf_names(model.cfg):
        if isinstance(theirs, list):
            for e, name in enumerate(theirs):
                out[name] = state[ours][e].contiguous()
        else:
            out[theirs] = state[ours].contiguous()
    for k in range(model.cfg.n_mtp_layers):
        layer = f"model.layers.{model.cfg.n_layers + k}."
        out[layer + "embed_tokens.weight"] = state["embed.weight"].clone()
        out[layer + "shared_head.head.weight"] = state["head.weight"].clone()
    return out
