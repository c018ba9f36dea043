"""Expert-parallel dispatch + combine per MoE layer beside the expert GEMMs, ep = 1 (LocalDispatcher), 2, 4.

Each rank holds T tokens routed uniformly at random to top-K of E experts and E/ep experts; the expert GEMM work
per rank is the same for every ep, so the columns show what the all-to-all adds. Times are fwd+bwd medians, the
maximum over ranks, each
piece started on all ranks at once; the all-to-all alone is timed as the layer's four exchanges on the same splits.

    python benchmarks/ep_dispatch.py [--tokens 2048 --dim 512 --experts 16 --topk 4 --inter 256] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from common import report  # noqa: E402


def _layer_step(disp, experts, x_TD, idx_TK, w_TK, g_TD) -> tuple[float, float, object]:
    """One fwd+bwd with the graph cut between pieces; returns (dispatch+combine s, expert GEMM s, ctx).

    A barrier (untimed) starts each piece on every rank at once, so a piece's time holds no wait for a rank
    that was slower in the previous piece (load imbalance and core oversubscription show up where they arise).
    """
    state = {}

    def dispatch():
        state["tokens"], state["counts"], state["ctx"] = disp.dispatch(x_TD, idx_TK, w_TK)
        state["tokens_in"] = state["tokens"].detach().requires_grad_()

    def experts_fwd():
        state["y"] = experts(state["tokens_in"], state["counts"])
        state["y_in"] = state["y"].detach().requires_grad_()

    pieces = [("dc", dispatch), ("gemm", experts_fwd),
              ("dc", lambda: disp.combine(state["y_in"], state["ctx"]).backward(g_TD)),
              ("gemm", lambda: state["y"].backward(state["y_in"].grad)),
              ("dc", lambda: state["tokens"].backward(state["tokens_in"].grad))]
    spent = {"dc": 0.0, "gemm": 0.0}
    for kind, fn in pieces:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        spent[kind] += time.perf_counter() - t0
    return spent["dc"], spent["gemm"], state["ctx"]


def _all_to_all_only(ctx, D: int) -> float:
    """The layer's four exchanges (dispatch, combine and their backwards) on buffers of the same sizes."""
    send, recv = torch.randn(sum(ctx.send_splits), D), torch.randn(sum(ctx.recv_splits), D)
    t0 = time.perf_counter()
    for a, b, out_s, in_s in ((recv, send, ctx.recv_splits, ctx.send_splits),
                              (send, recv, ctx.send_splits, ctx.recv_splits)) * 2:
        dist.all_to_all_single(a, b, out_s, in_s)
    return time.perf_counter() - t0


def _worker(rank: int, ep: int, args, init_file: str, out_file: str) -> None:
    from moetrain.model.dispatch import LocalDispatcher
    from moetrain.model.experts import GroupedExperts
    from moetrain.parallel.expert_parallel import AllToAllDispatcher, routing_ranks_per_token

    torch.set_num_threads(1)  # one core per rank, the same for every ep
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ep,
                            timeout=datetime.timedelta(seconds=120))
    try:
        T, D, E, K, F = args.tokens, args.dim, args.experts, args.topk, args.inter
        g = torch.Generator().manual_seed(rank)
        x_TD = torch.randn(T, D, generator=g).requires_grad_()
        idx_TK = torch.rand(T, E, generator=g).topk(K, dim=1).indices
        w_TK = torch.rand(T, K, generator=g).requires_grad_()
        g_TD = torch.randn(T, D, generator=g)
        experts = GroupedExperts(E // ep, D, F)
        for p in experts.parameters():
            torch.nn.init.normal_(p, std=D ** -0.5)
        disp = LocalDispatcher(E) if ep == 1 else AllToAllDispatcher(E, dist.group.WORLD)
        dc, gemm, a2a = [], [], []
        for step in range(args.warmup + args.steps):
            t_dc, t_gemm, ctx = _layer_step(disp, experts, x_TD, idx_TK, w_TK, g_TD)
            dist.barrier()
            t_a2a = _all_to_all_only(ctx, D) if ep > 1 else 0.0
            if step >= args.warmup:
                dc.append(t_dc), gemm.append(t_gemm), a2a.append(t_a2a)
        med = torch.tensor([sorted(v)[len(v) // 2] for v in (dc, gemm, a2a)], dtype=torch.float64)
        dist.all_reduce(med, op=dist.ReduceOp.MAX)
        off_rank_rows = 0 if ep == 1 else (sum(ctx.send_splits) - ctx.send_splits[rank]
                                           + sum(ctx.recv_splits) - ctx.recv_splits[rank])
        rows_t = torch.tensor([off_rank_rows], dtype=torch.float64)
        dist.all_reduce(rows_t, op=dist.ReduceOp.MAX)
        if rank == 0:
            t_dc, t_gemm, t_a2a = med.tolist()
            torch.save({"ep": ep, "dispatch_combine_ms": 1e3 * t_dc, "all_to_all_ms": 1e3 * t_a2a,
                        # each off-rank row crosses twice forward (dispatch, combine) and twice backward
                        "all_to_all_MB_per_rank": 2 * rows_t.item() * D * x_TD.element_size() / 1e6,
                        "expert_gemm_ms": 1e3 * t_gemm, "all_to_all_fraction": t_a2a / (t_dc + t_gemm),
                        "dispatch_combine_fraction": t_dc / (t_dc + t_gemm),
                        "ranks_per_token": routing_ranks_per_token(idx_TK, E, ep).item()}, out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--inter", type=int, default=256)
    p.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for ep in args.ep:
            out_file = os.path.join(d, f"ep{ep}.pt")
            mp.spawn(_worker, args=(ep, args, os.path.join(d, f"init{ep}"), out_file), nprocs=ep, join=True)
            rows.append(torch.load(out_file))
    report(rows, args.json)


if __name__ == "__main__":
    main()
