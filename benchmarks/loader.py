"""Data path throughput, each beside a plain peer in the same run.

1. Loader tokens/s (shuffled packed samples -> micro-batches with labels and document positions) against reading
   the same sample spans straight from the shards' memory maps.
2. ``prepare-data`` tokens/s per worker against a plain ``tokenizers`` ``encode_batch`` of the same text.

    python benchmarks/loader.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import report  # noqa: E402


def _texts(n_bytes: int) -> list[str]:
    from moetrain.data.demo import demo_documents

    return demo_documents(n_bytes)


def _best(fn, rounds: int = 5) -> float:
    """Best of several rounds after a warm-up round (lazy imports, page cache, first permutation)."""
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def loader_vs_memmap(ds_dir: Path, seq_len: int, steps: int, batch: int) -> dict:
    from moetrain.data import DataLoader, PackedSamples
    from moetrain.data.dataset import TokenDataset
    from moetrain.data.indexed import IndexedShard

    ds = TokenDataset(str(ds_dir), verify_checksums=False)
    samples = PackedSamples(ds, seq_len, ds.eos_id)
    loader = DataLoader([samples], [(0, len(samples))], [1.0], seed=0, dp_rank=0, dp_size=1,
                        micro_batch_size=batch, prefetch=False)
    # The peer: one memory map over the same shard, reading the same spans in the same order.
    shard = IndexedShard(ds_dir / ds.manifest.shards[0].name)
    order = loader.blend.lookup_many(0, steps * batch)[1].tolist()
    order = [k for k in order if (k + 1) * seq_len + 1 <= shard.n_tokens][: steps * batch]
    def raw():
        for k in order:
            np.array(shard.tokens[k * seq_len: k * seq_len + seq_len + 1])  # a copy of the same bytes

    def ours():
        loader.consumed = 0
        for _ in range(len(order) // batch):
            loader.next_step(batch)

    t_raw, t_loader = _best(raw), _best(ours)
    # What a training step sees with background prefetch: the wait in next_step while "computing" 2 ms.
    ahead = DataLoader([samples], [(0, len(samples))], [1.0], seed=0, dp_rank=0, dp_size=1, micro_batch_size=batch,
                       prefetch=True)
    waits = []
    for _ in range(len(order) // batch):
        t0 = time.perf_counter()
        ahead.next_step(batch)
        waits.append(time.perf_counter() - t0)
        ahead.prefetch(batch)
        time.sleep(0.002)
    n = len(order) // batch * batch * seq_len
    return {"exposed_wait_us_per_step": 1e6 * sorted(waits)[len(waits) // 2],"what": "loader", "loader_tokens_per_s": n / t_loader, "memmap_tokens_per_s": len(order) * seq_len / t_raw,
            "ratio": (n / t_loader) / (len(order) * seq_len / t_raw)}


def prepare_vs_tokenizers(texts: list[str], workdir: Path) -> dict:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from moetrain.data.prepare import prepare_documents

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4096, special_tokens=["[EOS]", "[UNK]"]))
    (workdir / "tok").mkdir()
    tok.save(str(workdir / "tok" / "tokenizer.json"))
    t0 = time.perf_counter()
    n = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = prepare_documents(texts, workdir / "ds", str(workdir / "tok"), workers=1, eos_id=0, progress=False)
    t_prep = time.perf_counter() - t0
    n_prep = sum(s.tokens for s in m.shards)
    return {"what": "prepare", "prepare_tokens_per_s_per_worker": n_prep / t_prep,
            "tokenizers_encode_batch_tokens_per_s": n / t_plain, "ratio": (n_prep / t_prep) / (n / t_plain)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bytes", type=int, default=1_000_000)
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from moetrain.data.prepare import prepare_documents

    texts = _texts(args.bytes)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        prepare_documents(texts, d / "bytes", "bytes", shard_tokens=1 << 30, progress=False)
        rows = [{"seq": seq, **loader_vs_memmap(d / "bytes", seq, args.steps, args.batch)} for seq in args.seq]
        rows.append(prepare_vs_tokenizers(texts, d))
    report(rows, args.json)


if __name__ == "__main__":
    main()
