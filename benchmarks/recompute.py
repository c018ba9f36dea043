"""Activation memory and step time of train.recompute=none|selective|full, measured beside the memory model.

Memory is what the allocator counts: the bytes the forward allocated that are still alive when it ends (what
backward will read: the activations ``moetrain plan`` calls "kept"), and the peak above the starting point over
forward and backward. On a GPU from ``torch.cuda.memory_allocated``; on CPU from the profiler's allocator events
(``profile_memory``), which track every CPU tensor allocation (resident memory would blur them with malloc's
caching). Each mode runs in a fresh process. ``planned`` is :mod:`moetrain.memory_model`'s figure.

    python benchmarks/recompute.py [--config small|wide|dense] [--dtype fp32|bf16] [--batch 8] [--seq 512]
                                   [--loss-chunk 0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONFIGS = {
    # q_lora, shared expert, group-limited routing, MTP depth 1
    "small": dict(vocab_size=4096, dim=256, inter_dim=768, n_layers=6, n_mtp_layers=1,
                  attn=dict(n_heads=8, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                            v_head_dim=32),
                  moe=dict(n_routed_experts=16, n_shared_experts=1, moe_inter_dim=128,
                           router=dict(topk=4, n_group=4, topk_group=2))),
    # V2-Lite's shape in small: no q compression, 2 shared experts, v_head_dim != nope, softmax gate, 2 dense blocks
    "wide": dict(vocab_size=2048, dim=192, inter_dim=512, n_layers=5, n_mtp_layers=0,
                 attn=dict(n_heads=6, q_lora_rank=0, kv_lora_rank=96, qk_nope_head_dim=48, qk_rope_head_dim=16,
                           v_head_dim=40),
                 moe=dict(n_routed_experts=32, n_shared_experts=2, moe_inter_dim=96, first_k_dense_replace=2,
                          router=dict(topk=6, scoring_func="softmax", selection_bias=False))),
    # no shared experts, top-2 of 8, MTP depth 2, a large vocabulary next to the width; v_head_dim = qk_head_dim,
    # so that CPUs run the fused (flash) attention kernel GPUs run
    "dense": dict(vocab_size=8192, dim=128, inter_dim=384, n_layers=4, n_mtp_layers=2,
                  attn=dict(n_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                            v_head_dim=48),
                  moe=dict(n_routed_experts=8, n_shared_experts=0, moe_inter_dim=160,
                           router=dict(topk=2))),
}


def _build(name: str, seq: int):
    from moetrain.model import MLAConfig, ModelConfig, MoEConfig, RouterConfig

    c = {k: v for k, v in CONFIGS[name].items() if k not in ("attn", "moe")}
    moe = {k: v for k, v in CONFIGS[name]["moe"].items() if k != "router"}
    return ModelConfig(**c, max_seq_len=seq, attn=MLAConfig(**CONFIGS[name]["attn"]),
                       moe=MoEConfig(**moe, router=RouterConfig(**CONFIGS[name]["moe"]["router"])))


def planned(name: str, mode: str, batch: int, seq: int, dtype: str, loss_chunk: int = 0) -> float:
    """The memory model's kept activation bytes of one micro-batch."""
    from moetrain.memory_model import Activations, activation_bytes_per_token

    cfg = _build(name, seq)
    # CPU attention: flash when v_head_dim == qk_head_dim, else the math fallback (GPUs run a fused kernel).
    fused = cfg.attn.v_head_dim == cfg.attn.qk_head_dim or _cuda()
    x = Activations(a=2 if dtype == "bf16" else 4, mode=mode, attention="fused" if fused else "math", seq_len=seq,
                    loss_chunk=loss_chunk)
    return batch * seq * activation_bytes_per_token(cfg, list(range(cfg.n_layers)), x)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def measure(name: str, mode: str, batch: int, seq: int, dtype: str, loss_chunk: int = 0) -> dict:
    import torch

    from moetrain.model import build_model, init_weights
    from moetrain.parallel.recompute import apply_recompute

    torch.manual_seed(0)
    cfg = _build(name, seq)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = build_model(cfg, "meta").to_empty(device=device)
    init_weights(model)
    if dtype == "bf16":  # as FSDP's bf16 gather gives the forward: bf16 weights, the router computing in fp32
        model.to(torch.bfloat16)
    apply_recompute(model, mode)
    model.loss_chunk_tokens = loss_chunk
    model.train()
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    labels = tokens.roll(-1, 1)

    def forward():
        out = model(tokens, labels)
        return out, out.loss(out.n_tokens, 0.3)

    out, loss = forward()
    loss.backward()  # warm-up: gradients allocated, kernels chosen
    del out, loss
    t0 = time.perf_counter()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out, loss = forward()
        kept = torch.cuda.memory_allocated() - before
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out, loss = forward()
            marker = torch.empty(1)  # an allocation event at the end of the forward
            loss.backward()
        kept, peak = _allocated_at(prof, marker.data_ptr())
    return {"config": name, "recompute": mode, "dtype": dtype, "loss_chunk": loss_chunk, "kept_mb": kept / 2**20,
            "peak_mb": peak / 2**20, "planned_mb": planned(name, mode, batch, seq, dtype, loss_chunk) / 2**20,
            "step_s": time.perf_counter() - t0}


def _allocated_at(prof, marker_addr: int) -> tuple[int, int]:
    """(bytes allocated when the marker was, the most allocated at any time), both since the profile began."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        with open(f"{tmp}/trace.json") as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    events.sort(key=lambda e: e["ts"])
    # The profiler's running total may start from an earlier profile's in the same process: measure from its start.
    base = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    totals = [e["args"]["Total Allocated"] - base for e in events]
    # The marker is still alive, so its allocation is the last one at its address (freed blocks are reused).
    at = max(i for i, e in enumerate(events) if e["args"]["Addr"] == marker_addr and e["args"]["Bytes"] > 0)
    return totals[at] - events[at]["args"]["Bytes"], max(totals)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="small", choices=sorted(CONFIGS))
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--loss-chunk", type=int, default=0, help="train.loss_chunk_tokens (0: the full logits)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.config, args.one, args.batch, args.seq, args.dtype, args.loss_chunk)))
        return
    rows = []
    for mode in ("none", "selective", "full"):
        out = subprocess.run([sys.executable, __file__, "--one", mode, "--config", args.config, "--dtype", args.dtype,
                              "--batch", str(args.batch), "--seq", str(args.seq), "--loss-chunk", str(args.loss_chunk)],
                             capture_output=True, text=True, check=True, env={**os.environ}).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    for r in rows:
        print(f"{r['config']} {r['dtype']} recompute={r['recompute']:<9}  kept_mb={r['kept_mb']:8.1f} "
              f"(planned {r['planned_mb']:8.1f}, {r['planned_mb'] / r['kept_mb']:.3f}x)  "
              f"({r['kept_mb'] / base['kept_mb']:.2f}x of none)  peak_mb={r['peak_mb']:8.1f}  "
              f"step_s={r['step_s']:.3f} ({r['step_s'] / base['step_s']:.2f}x of none)")


if __name__ == "__main__":
    main()
