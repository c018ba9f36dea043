"""Shared helpers of the benchmarks: a same-weights pair (moetrain, transformers) and a fair timer."""

from __future__ import annotations

import json
import platform
import tempfile
import time

import torch


def bench_hf_config(size: str, device: str):
    """A transformers DeepseekV3Config: 'cpu' fits a 2-core machine, 'proxy' is DESIGN.md's H200 proxy."""
    from transformers import DeepseekV3Config

    if size == "proxy":
        shape = dict(vocab_size=129280, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                     num_hidden_layers=12, num_attention_heads=16, n_shared_experts=2, n_routed_experts=64,
                     num_experts_per_tok=6, n_group=8, topk_group=4, first_k_dense_replace=1, q_lora_rank=None,
                     kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                     max_position_embeddings=4096)
    else:
        shape = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                     num_hidden_layers=4, num_attention_heads=8, n_shared_experts=1, n_routed_experts=16,
                     num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=128,
                     kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                     max_position_embeddings=1024)
    return DeepseekV3Config(**shape, num_mtp_layers=0, routed_scaling_factor=2.5, norm_topk_prob=True,
                            initializer_range=0.02)


def same_weights_pair(hf_config, dtype: torch.dtype, device: str):
    """(transformers model, moetrain model) holding identical weights, both in train mode."""
    from transformers import DeepseekV3ForCausalLM

    from moetrain.hf import from_hf_pretrained

    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(hf_config)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = from_hf_pretrained(d, dtype=dtype, device=device)
    hf = hf.to(device=device, dtype=dtype)
    for m in ours.modules():  # NOTE: HF has no balance loss; switch ours off so both do the same work
        if hasattr(m, "alpha"):
            m.alpha = 0.0
    return hf.train(), ours.train()


def timed(fn, steps: int, warmup: int, device: str) -> float:
    """Median seconds of one call after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def report(rows: list[dict], path: str | None) -> None:
    for r in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if path:
        with open(path, "w") as f:
            json.dump({"machine": machine(), "rows": rows}, f, indent=2)
