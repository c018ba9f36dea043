"""MLA's attention core at DeepSeek-V3's head dims (q/k 192, v 128, YaRN-free scale) per backend and mask.

Rows: sdpa causal, sdpa with the dense per-document mask, flex causal, flex per document (moetrain.model.attention).
Documents are the demo corpus's, packed back to back in a seeded order. Each row reports the mask's build time, the
forward + backward time of the core (median of ``--rounds``, after a warm-up that compiles flex on CUDA), the peak
memory above the inputs (CUDA) and, for flex, the share of the causal tiles its block mask keeps. On CPU the flex
rows run FlexAttention's dense eager reference: their times say nothing about the CUDA kernel.

    python benchmarks/attention.py [--seq 4096] [--batch 2] [--heads 16] [--dtype bf16|fp32] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from moetrain.data.demo import demo_documents
from moetrain.model.attention import BLOCK, attend, attention_mask, block_mask


def packed_doc_ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """[batch, seq] document ids of demo documents (bytes + EOS) packed back to back, each row from 0."""
    lengths = np.array([len(d.encode()) + 1 for d in demo_documents(1_000_000)])
    order = np.random.default_rng(seed).permutation(lengths)
    stream = np.repeat(np.arange(len(order)), order)[: batch * seq].reshape(batch, seq)
    return torch.from_numpy(stream - stream[:, :1])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(backend: str, doc_ids, q, k, v, rounds: int) -> dict:
    device, T = q.device, q.shape[2]

    def step():
        t0 = time.perf_counter()
        mask = attention_mask(backend, doc_ids, T, device)
        _sync(device)
        t1 = time.perf_counter()
        qkv = [x.detach().requires_grad_() for x in (q, k, v)]
        attend(*qkv, mask, q.shape[-1] ** -0.5).sum().backward()
        _sync(device)
        return t1 - t0, time.perf_counter() - t1

    step()  # warm-up: compiles flex on CUDA
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    times = [step() for _ in range(rounds)]
    row = {"backend": backend, "mask": "causal" if doc_ids is None else "documents",
           "mask_ms": round(1e3 * statistics.median(t[0] for t in times), 2),
           "fwd_bwd_ms": round(1e3 * statistics.median(t[1] for t in times), 2)}
    if device.type == "cuda":
        row["peak_gib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**30, 3)
    if backend == "flex":
        bm = block_mask(doc_ids, T, device)
        n = -(-T // BLOCK)
        kept = (bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()).item() / bm.kv_num_blocks.shape[0]
        row["tiles_kept_of_causal"] = round(kept / (n * (n + 1) / 2), 4)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(0)
    shape = (a.batch, a.heads, a.seq)
    q, k, v = (torch.randn(*shape, d, device=device, dtype=dtype) for d in (192, 192, 128))
    doc_ids = packed_doc_ids(a.batch, a.seq).to(device)
    rows = [measure(backend, docs, q, k, v, a.rounds) for backend in ("sdpa", "flex") for docs in (None, doc_ids)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__, "dtype": str(dtype), "batch": a.batch, "seq": a.seq,
              "heads": a.heads, "documents_per_row": (doc_ids[:, -1] + 1).tolist(), "rows": rows}
    for row in rows:
        print(row)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
