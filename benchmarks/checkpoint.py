"""Checkpoint save and load GB/s against copying the same bytes with ``cp``, in the same run.

    python benchmarks/checkpoint.py [--dim 512 --layers 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import report  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from moetrain.checkpoint.manager import CheckpointManager, step_dir
    from moetrain.model import MLAConfig, ModelConfig, MoEConfig, RouterConfig, build_model, init_weights

    cfg = ModelConfig(vocab_size=32000, dim=args.dim, inter_dim=4 * args.dim, n_layers=args.layers, max_seq_len=512,
                      attn=MLAConfig(n_heads=8, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
                                     v_head_dim=64),
                      moe=MoEConfig(n_routed_experts=args.experts, n_shared_experts=1, moe_inter_dim=args.dim // 2,
                                    router=RouterConfig(topk=4, n_group=4, topk_group=2)))
    model = build_model(cfg, "meta").to_empty(device="cpu")
    init_weights(model)
    opt = torch.optim.AdamW(model.parameters())
    for p_ in model.parameters():  # materialise Adam's state so that it is part of the checkpoint
        p_.grad = torch.zeros_like(p_)
    opt.step()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        root = Path(d)
        mgr = CheckpointManager(root / "ckpt", keep_last=10, rank=0, world_size=1, log=lambda m: None)
        rows = []
        for step in (1, 2, 3):
            t0 = time.perf_counter()
            mgr.save(step, model, opt, {"step": step}, "model: {}\n")
            t_save = time.perf_counter() - t0
            path = step_dir(root / "ckpt", step)
            nbytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            t0 = time.perf_counter()
            subprocess.run(["cp", "-r", str(path), str(root / f"copy{step}")], check=True)
            t_cp = time.perf_counter() - t0
            t0 = time.perf_counter()
            mgr.load(path, model, opt)
            t_load = time.perf_counter() - t0
            shutil.rmtree(root / f"copy{step}")
            rows.append({"round": step, "GB": nbytes / 1e9, "save_GBps": nbytes / t_save / 1e9,
                         "load_GBps": nbytes / t_load / 1e9, "cp_GBps": nbytes / t_cp / 1e9,
                         "save_vs_cp": t_cp / t_save, "load_vs_cp": t_cp / t_load})
    report(rows, args.json)


if __name__ == "__main__":
    main()
