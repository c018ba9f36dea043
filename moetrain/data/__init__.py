"""Data: prepared token shards, the demo corpus, and the deterministic resumable loader."""

from __future__ import annotations

import fcntl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from moetrain.data.loader import PackedSamples

# The loader (torch, the model) is imported on first use, not with the package: prepare-data and its worker
# processes import moetrain.data and need none of it (it took them ~2.5 s each).
_LOADER_NAMES = ("Batch", "Blend", "DataLoader", "PackedSamples", "make_batch", "split_ranges")


def __getattr__(name: str):
    if name in _LOADER_NAMES:
        from moetrain.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class Sources:
    samples: list[PackedSamples]
    weights: list[float]
    train_ranges: list[tuple[int, int]]
    val_ranges: list[tuple[int, int]]
    blend_id: list  # [[path, weight], ...]: identifies the blend in checkpoints
    unigram_entropy: float | None


def cache_root(data_cfg) -> Path:
    return Path(data_cfg.cache_dir) if data_cfg.cache_dir else Path.home() / ".cache" / "moetrain"


def demo_dataset_dir(data_cfg) -> Path:
    """The demo corpus as shards, prepared on first use and cached (keyed by Python version and size)."""
    from moetrain.data.demo import demo_documents
    from moetrain.data.prepare import prepare_documents

    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    out = cache_root(data_cfg) / "demo" / f"{version}-{data_cfg.demo_bytes}"
    out.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: two runs on one machine (two jobs, two test workers) may both find the cache missing; the lock makes
    # the second wait for the first's shards instead of writing the same files at once.
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "progress.json").exists() or '"done": true' not in (out / "progress.json").read_text():
            prepare_documents(demo_documents(data_cfg.demo_bytes), out, "bytes", shard_tokens=1 << 19, workers=1,
                              progress=False, inputs_id={"demo": "stdlib docstrings", "bytes": data_cfg.demo_bytes,
                                                         "python": version})
    return out


def build_sources(data_cfg, seq_len: int, vocab_size: int) -> Sources:
    """The sample sources of ``data.kind``, split into training and held-out validation ranges."""
    from moetrain.data.dataset import TokenDataset
    from moetrain.data.loader import PackedSamples, split_ranges

    if data_cfg.kind == "synthetic":
        rng = np.random.Generator(np.random.PCG64(data_cfg.seed))
        tokens = rng.integers(0, vocab_size, max(1 << 20, 64 * (seq_len + 1)), dtype=np.int64)
        sources, weights, ids = [PackedSamples(tokens, seq_len, None, "synthetic")], [1.0], [["synthetic", 1.0]]
        entropy = float(np.log(vocab_size))
    else:
        paths = [str(demo_dataset_dir(data_cfg))] if data_cfg.kind == "demo" else list(data_cfg.paths)
        weights = [1.0] if data_cfg.kind == "demo" else list(data_cfg.weights or [1.0] * len(paths))
        sets = [TokenDataset(p, vocab_size, str(cache_root(data_cfg) / "shards"), data_cfg.verify_checksums)
                for p in paths]
        _check_one_tokenizer(sets, paths)
        sources = [PackedSamples(d, seq_len, d.eos_id, p) for d, p in zip(sets, paths)]
        ids = [["demo" if data_cfg.kind == "demo" else p, w] for p, w in zip(paths, weights)]
        entropy = _unigram_entropy(sets[0]) if data_cfg.kind == "demo" else None
    ranges = [split_ranges(len(s), data_cfg.val_fraction) for s in sources]
    return Sources(sources, weights, [r[0] for r in ranges], [r[1] for r in ranges], ids, entropy)


def _check_one_tokenizer(sets, paths: list[str]) -> None:
    """A blend mixes token ids, so every dataset must come from the same tokenizer (same ids, same EOS).

    Datasets carry a fingerprint of their tokenizer's files; manifests written before fingerprints fall back to the
    tokenizer name (its path when prepared) and vocab_size, which the error then says.
    """
    first, path0 = sets[0].manifest, paths[0]
    for d, path in zip(sets[1:], paths[1:]):
        m = d.manifest
        if first.tokenizer_fingerprint and m.tokenizer_fingerprint:
            if m.tokenizer_fingerprint != first.tokenizer_fingerprint:
                raise ValueError(f"data.paths: {path0} and {path} were tokenized with different tokenizers "
                                 f"(fingerprints differ: {first.tokenizer_fingerprint} vs {m.tokenizer_fingerprint})")
        elif (m.tokenizer, m.vocab_size) != (first.tokenizer, first.vocab_size):
            old = path0 if not first.tokenizer_fingerprint else path
            raise ValueError(f"data.paths: {path0} and {path} use different tokenizers ({first.tokenizer!r}, "
                             f"vocab_size {first.vocab_size} vs {m.tokenizer!r}, vocab_size {m.vocab_size}); {old} "
                             "has no tokenizer fingerprint (an older manifest), so name and vocab_size were compared")
        if m.eos_id != first.eos_id:
            raise ValueError(f"data.paths: {path0} and {path} use different EOS ids ({first.eos_id} vs {m.eos_id})")


def _unigram_entropy(dataset) -> float:
    from moetrain.data.demo import unigram_entropy

    return unigram_entropy(dataset[0:len(dataset)])


__all__ = ["Batch", "Blend", "DataLoader", "PackedSamples", "Sources", "build_sources", "make_batch",
           "split_ranges"]
