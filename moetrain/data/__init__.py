"""Data: the demo corpus, the byte tokenizer, and the deterministic resumable loader."""

from __future__ import annotations

import numpy as np

from moetrain.data.loader import Batch, DataLoader, PackedSamples, split_ranges


def build_samples(data_cfg, seq_len: int, vocab_size: int) -> tuple[PackedSamples, dict]:
    """The sample source of ``data.kind`` and facts about it (e.g. the unigram entropy of the demo text)."""
    if data_cfg.kind == "demo":
        from moetrain.data.demo import demo_tokens, unigram_entropy
        from moetrain.data.tokenizer import ByteTokenizer

        if vocab_size < ByteTokenizer.vocab_size:
            raise ValueError(f"data=demo needs model.vocab_size >= {ByteTokenizer.vocab_size} (bytes + EOS), "
                             f"got {vocab_size}")
        tokens = demo_tokens(data_cfg.demo_bytes)
        return PackedSamples(tokens, seq_len, ByteTokenizer.eos_id), {"unigram_entropy": unigram_entropy(tokens)}
    rng = np.random.Generator(np.random.PCG64(data_cfg.seed))
    n = max(1 << 20, 64 * (seq_len + 1))
    tokens = rng.integers(0, vocab_size, n, dtype=np.int64 if vocab_size > 65535 else np.uint16)
    return PackedSamples(tokens, seq_len, None), {"unigram_entropy": float(np.log(vocab_size))}


__all__ = ["Batch", "DataLoader", "PackedSamples", "build_samples", "split_ranges"]
