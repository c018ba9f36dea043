"""Activation memory and step time of train.recompute=none|selective|full, side by side.

Memory is what the forward pass keeps alive for backward: on a GPU the peak allocated minus the resident model,
on CPU the growth of resident memory over the forward pass (each mode in a fresh process, so that allocator
reuse does not blur it).

    python benchmarks/recompute.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def measure(mode: str, batch: int, seq: int) -> dict:
    import psutil
    import torch

    sys.path.insert(0, os.path.dirname(__file__))
    from moetrain.model import MLAConfig, ModelConfig, MoEConfig, RouterConfig, build_model, init_weights
    from moetrain.parallel.recompute import apply_recompute

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=4096, dim=256, inter_dim=768, n_layers=6, n_mtp_layers=1, max_seq_len=seq,
                      attn=MLAConfig(n_heads=8, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
                                     qk_rope_head_dim=16, v_head_dim=32),
                      moe=MoEConfig(n_routed_experts=16, n_shared_experts=1, moe_inter_dim=128,
                                    router=RouterConfig(topk=4, n_group=4, topk_group=2)))
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = build_model(cfg, "meta").to_empty(device=device)
    init_weights(model)
    apply_recompute(model, mode)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    labels = tokens.roll(-1, 1)

    def step():
        out = model(tokens, labels)
        return out.loss(out.n_tokens, 0.3)

    step().backward()  # warm-up: gradients allocated, kernels chosen
    proc = psutil.Process()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = proc.memory_info().rss
    t0 = time.perf_counter()
    loss = step()
    after = torch.cuda.max_memory_allocated() if cuda else proc.memory_info().rss
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    return {"recompute": mode, "activation_mb": (after - before) / 2**20, "step_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.batch, args.seq)))
        return
    rows = []
    for mode in ("none", "selective", "full"):
        out = subprocess.run([sys.executable, __file__, "--one", mode, "--batch", str(args.batch), "--seq",
                              str(args.seq)], capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    for r in rows:
        print(f"recompute={r['recompute']:<9}  activation_mb={r['activation_mb']:8.1f}  "
              f"({r['activation_mb'] / base['activation_mb']:.2f}x of none)  step_s={r['step_s']:.3f}  "
              f"({r['step_s'] / base['step_s']:.2f}x of none)")


if __name__ == "__main__":
    main()
