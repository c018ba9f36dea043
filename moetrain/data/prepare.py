"""``moetrain prepare-data``: tokenise text into Megatron-layout shards with a manifest, resumably.

Input goes through Hugging Face ``datasets`` in streaming mode (json/jsonl/parquet/text files, or a dataset
directory saved with ``save_to_disk``), so inputs larger than memory work. Documents are tokenised by a pool of
worker processes in order, each followed by EOS, and written to shards of about ``--shard-tokens`` tokens.

Resumable: after each completed shard the manifest and a progress file record the shards and the number of
documents consumed. A restarted run skips those documents and continues with the next shard; a shard that was
being written when the run stopped is discarded (it never had its final name), so no document is duplicated.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moetrain.data.dataset import Manifest, ShardInfo, sha256_file
from moetrain.data.indexed import ShardWriter, token_dtype

PROGRESS = "progress.json"
_BATCH_DOCS = 256  # documents per worker task


# --------------------------------------------------------------------------------------------- tokenizers
class _HFTokenizer:
    """A local Hugging Face tokenizer directory (tokenizer.json, via ``tokenizers``)."""

    def __init__(self, path: str, eos_id: int | None):
        from tokenizers import Tokenizer

        file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
        if not file.exists():
            raise FileNotFoundError(f"--tokenizer {path}: no tokenizer.json found")
        self._tok = Tokenizer.from_file(str(file))
        self.name = str(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if eos_id is None:
            eos_id = _eos_from_config(Path(path), self._tok)
        self.eos_id = eos_id

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch(texts, add_special_tokens=False)]


def _eos_from_config(path: Path, tok) -> int:
    config = path / "tokenizer_config.json" if path.is_dir() else None
    if config and config.exists():
        eos = json.loads(config.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if eos is not None and tok.token_to_id(eos) is not None:
            return tok.token_to_id(eos)
    raise ValueError(f"--tokenizer {path}: cannot tell the EOS token; pass --eos-id")


class _ByteTokenizerBatch:
    def __init__(self):
        from moetrain.data.tokenizer import ByteTokenizer

        self._tok = ByteTokenizer()
        self.name, self.vocab_size, self.eos_id = self._tok.name, self._tok.vocab_size, self._tok.eos_id

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self._tok.encode(t).astype(np.int64) for t in texts]


def load_tokenizer(spec: str, eos_id: int | None = None):
    return _ByteTokenizerBatch() if spec in ("bytes", "byte") else _HFTokenizer(spec, eos_id)


_worker_tok = None


def _init_worker(spec: str, eos_id: int | None) -> None:
    global _worker_tok
    _worker_tok = load_tokenizer(spec, eos_id)


def _encode(texts: list[str]) -> list[np.ndarray]:
    return _worker_tok.encode_batch(texts)


# --------------------------------------------------------------------------------------------- the writer
def prepare_documents(texts: Iterable[str], out_dir: str | os.PathLike, tokenizer: str = "bytes",
                      shard_tokens: int = 1 << 26, workers: int = 1, eos_id: int | None = None,
                      progress: bool = True) -> Manifest:
    """Tokenise ``texts`` into shards under ``out_dir``; resumes a previous interrupted run of the same input."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(tokenizer, eos_id)
    dtype = token_dtype(tok.vocab_size)
    state = _load_progress(out, tok.name)
    manifest = Manifest(tokenizer=tok.name, vocab_size=tok.vocab_size, eos_id=int(tok.eos_id), dtype=dtype.name,
                        shards=[ShardInfo(**s) for s in state["shards"]])
    if state["done"]:
        return manifest
    docs_done = state["documents"]
    remaining = itertools.islice(iter(texts), docs_done, None)
    batches = _batches(remaining, _BATCH_DOCS)
    writer, t0, tokens_done = None, time.perf_counter(), 0
    bar = tqdm(desc="prepare-data", unit=" docs", initial=docs_done, disable=not progress, file=sys.stderr)

    def close_shard():
        nonlocal writer
        name = writer.prefix.name
        writer.finalize()
        manifest.shards.append(ShardInfo(name, len(writer.lengths), writer.n_tokens,
                                         sha256_file(out / f"{name}.bin"), sha256_file(out / f"{name}.idx")))
        _save_progress(out, manifest, docs_done, done=False)
        writer = None

    ctx = get_context("spawn")
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer, eos_id)) if workers > 1 else None
    try:
        encoded = pool.imap(_encode, batches) if pool else map(tok.encode_batch, batches)
        for docs in encoded:
            for ids in docs:
                if writer is None:
                    writer = ShardWriter(out / f"shard_{len(manifest.shards):05d}", dtype)
                writer.add_document(np.append(ids, tok.eos_id))
                docs_done += 1
                tokens_done += len(ids) + 1
                if writer.n_tokens >= shard_tokens:
                    close_shard()
            bar.update(len(docs))
            bar.set_postfix(shards=len(manifest.shards),
                            tokens_per_s=f"{tokens_done / max(time.perf_counter() - t0, 1e-9) / 1e6:.2f}M")
        if writer is not None and writer.lengths:
            close_shard()
    finally:
        if pool:
            pool.terminate()
        bar.close()
    _save_progress(out, manifest, docs_done, done=True)
    return manifest


def _batches(it: Iterator[str], n: int) -> Iterator[list[str]]:
    while batch := list(itertools.islice(it, n)):
        yield batch


def _load_progress(out: Path, tokenizer: str) -> dict:
    path = out / PROGRESS
    if not path.exists():
        foreign = [f.name for f in out.iterdir() if not f.name.endswith(".tmp")]
        if foreign:  # never overwrite data that this tool did not start writing
            raise FileExistsError(f"--output {out} already holds {foreign[:3]} and no {PROGRESS}; "
                                  "choose an empty or new directory")
        for stale in out.glob("*.tmp"):  # left by a run that died before its first shard completed
            stale.unlink()
        return {"documents": 0, "shards": [], "done": False}
    state = json.loads(path.read_text())
    if state["tokenizer"] != tokenizer:
        raise ValueError(f"{path}: this directory was prepared with tokenizer {state['tokenizer']!r}, "
                         f"not {tokenizer!r}; use a new --output directory")
    complete = {s["name"] for s in state["shards"]}
    for f in out.glob("shard_*"):  # a shard being written when the run stopped is discarded
        if f.name.split(".")[0] not in complete or f.suffix in (".tmp", ".part"):
            f.unlink()
    return state


def _save_progress(out: Path, manifest: Manifest, documents: int, done: bool) -> None:
    manifest.save(out)
    tmp = out / (PROGRESS + ".tmp")
    tmp.write_text(json.dumps({"tokenizer": manifest.tokenizer, "documents": documents, "done": done,
                               "shards": [vars(s) for s in manifest.shards]}))
    os.replace(tmp, out / PROGRESS)


# ---------------------------------------------------------------------------------------------------- CLI
def _stream_texts(inputs: list[str], text_key: str, fmt: str | None) -> Iterator[str]:
    """Documents of local files or a saved dataset directory, streamed through ``datasets``."""
    import datasets

    if len(inputs) == 1 and Path(inputs[0]).is_dir() and (Path(inputs[0]) / "dataset_info.json").exists():
        ds = datasets.load_from_disk(inputs[0])
        ds = ds[next(iter(ds))] if isinstance(ds, datasets.DatasetDict) else ds
        stream = ds.to_iterable_dataset()
    else:
        fmt = fmt or _format_of(inputs[0])
        stream = datasets.load_dataset(fmt, data_files=inputs, split="train", streaming=True)
    for row in stream:
        if text_key not in row:
            raise KeyError(f"input rows have no field {text_key!r} (fields: {sorted(row)}); set --text-key")
        yield row[text_key]


def _format_of(path: str) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    return {"jsonl": "json", "json": "json", "parquet": "parquet", "txt": "text", "text": "text"}.get(suffix) or \
        sys.exit(f"prepare-data: cannot tell the format of {path}; pass --format json|parquet|text")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moetrain prepare-data", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="json/jsonl/parquet/text files, or a saved datasets directory")
    p.add_argument("--output", required=True, help="dataset directory to write (manifest.json + shards)")
    p.add_argument("--tokenizer", default="bytes", help="'bytes' or a local Hugging Face tokenizer directory")
    p.add_argument("--eos-id", type=int, default=None)
    p.add_argument("--text-key", default="text")
    p.add_argument("--format", default=None, choices=["json", "parquet", "text"])
    p.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard (default 64M)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = p.parse_args(argv)
    m = prepare_documents(_stream_texts(args.inputs, args.text_key, args.format), args.output, args.tokenizer,
                          args.shard_tokens, args.workers, args.eos_id)
    total = sum(s.tokens for s in m.shards)
    print(f"prepare-data: {sum(s.documents for s in m.shards)} documents, {total} tokens in {len(m.shards)} "
          f"shards -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
