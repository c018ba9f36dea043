"""Forward+backward of moetrain against transformers' DeepseekV3ForCausalLM: same config, weights and batch.

    python benchmarks/model_step.py                  # CPU-sized model, fp32
    python benchmarks/model_step.py --size proxy --device cuda --dtype bfloat16 --batch 4 --seq 4096

Prints tokens/s of both and their ratio. The two runs alternate so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import bench_hf_config, report, same_weights_pair, timed  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="cpu", choices=["cpu", "proxy"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile moetrain's blocks (as train.compile)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    hf, ours = same_weights_pair(bench_hf_config(args.size, args.device), dtype, args.device)
    if args.compile:
        for block in ours.layers.values():
            block.compile()
    tokens = torch.randint(0, hf.config.vocab_size, (args.batch, args.seq), device=args.device)
    labels = tokens.roll(-1, 1)  # moetrain takes shifted labels; transformers shifts inside its loss
    labels[:, -1] = -100

    def step_hf():
        hf(tokens, labels=tokens).loss.backward()
        hf.zero_grad(set_to_none=True)

    def step_ours():
        out = ours(tokens, labels)
        (out.lm_loss_sum / out.n_tokens).backward()
        ours.zero_grad(set_to_none=True)

    with torch.no_grad():  # same work: the losses must agree before timing means anything
        l_hf = hf(tokens, labels=tokens).loss.item()
        o = ours(tokens, labels)
        l_ours = (o.lm_loss_sum / o.n_tokens).item()
    t_hf, t_ours = float("inf"), float("inf")
    for _ in range(args.rounds):
        t_hf = min(t_hf, timed(step_hf, args.steps, 1, args.device))
        t_ours = min(t_ours, timed(step_ours, args.steps, 1, args.device))
    n = args.batch * args.seq
    report([{"impl": "transformers", "experts": hf.config._experts_implementation, "loss": l_hf,
             "tokens_per_s": n / t_hf},
            {"impl": "moetrain", "loss": l_ours, "tokens_per_s": n / t_ours},
            {"speedup": t_hf / t_ours, "size": args.size, "dtype": args.dtype, "device": args.device,
             "batch": args.batch, "seq": args.seq, "compile": args.compile}], args.json)


if __name__ == "__main__":
    main()
