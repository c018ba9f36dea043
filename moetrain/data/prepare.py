"""``moetrain prepare-data``: tokenise text into Megatron-layout shards with a manifest, resumably.

Input is streamed (json/jsonl/text files line by line, parquet files and directories saved with ``save_to_disk``
through Hugging Face ``datasets``; see :mod:`moetrain.data.inputs`), so inputs larger than memory work. Documents
are tokenised by a pool of worker processes in order, each followed by EOS, and written to shards of about
``--shard-tokens`` tokens. A bad document (malformed JSON, bytes that are not UTF-8, a text that is null or not a
string) stops the run naming its file and line, or with ``--on-bad-document=skip`` is left out and counted.

Resumable: after each completed shard the manifest and a progress file record the shards and the number of
documents consumed. A restarted run skips those documents and continues with the next shard; a shard that was
being written when the run stopped is discarded (it never had its final name), so no document is duplicated.
Both files also record what the data was made from (the input files' paths, sizes and mtimes; a fingerprint of
the tokenizer's files), and a re-run with other inputs or another tokenizer is refused, naming the difference.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moetrain.data.dataset import Manifest, ShardInfo, sha256_file
from moetrain.data.indexed import ShardWriter, token_dtype
from moetrain.data.inputs import BadDocument, InputError, InputSize, check_inputs, describe_inputs, \
    input_size, inputs_difference, read_documents

PROGRESS = "progress.json"
BAD_DOCUMENT_POLICIES = ("fail", "skip")
_BATCH_DOCS = 256  # documents per worker task
_SKIPPED_EXAMPLES = 5  # locations of skipped documents kept for the summary and the manifest
EXIT_BAD_INPUT = 2  # prepare-data's exit status for unusable input or options (as argparse's usage errors)


class PrepareError(ValueError):
    """The input, the tokenizer or the output directory cannot be used as given; the message says which."""


class BadDocumentError(PrepareError):
    """A bad input document under ``on_bad_document="fail"``; the message names its file and line (or row)."""


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
        config = Path(path) / "tokenizer_config.json" if Path(path).is_dir() else None
        self.fingerprint = _files_fingerprint([file] + ([config] if config and config.exists() else []))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if eos_id is None:
            eos_id = _eos_from_config(Path(path), self._tok)
        self.eos_id = eos_id

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch(texts, add_special_tokens=False)]


def _files_fingerprint(files: list[Path]) -> str:
    """sha256 of the files' names and contents: the same tokenizer anywhere on disk has the same fingerprint."""
    h = hashlib.sha256()
    for f in files:
        data = f.read_bytes()
        h.update(f"{f.name}\0{len(data)}\0".encode())
        h.update(data)
    return "sha256:" + h.hexdigest()


def _eos_from_config(path: Path, tok) -> int:
    config = path / "tokenizer_config.json" if path.is_dir() else None
    if config and config.exists():
        eos = json.loads(config.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if eos is not None and tok.token_to_id(eos) is not None:
            return tok.token_to_id(eos)
    raise PrepareError(f"--tokenizer {path}: cannot tell the EOS token; pass --eos-id")


class _ByteTokenizerBatch:
    def __init__(self):
        from moetrain.data.tokenizer import ByteTokenizer

        self._tok = ByteTokenizer()
        self.name, self.vocab_size, self.eos_id = self._tok.name, self._tok.vocab_size, self._tok.eos_id
        self.fingerprint = self._tok.fingerprint

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self._tok.encode(t).astype(np.int64) for t in texts]


def load_tokenizer(spec: str, eos_id: int | None = None):
    return _ByteTokenizerBatch() if spec in ("bytes", "byte") else _HFTokenizer(spec, eos_id)


_worker_tok = None


def _init_worker(spec: str, eos_id: int | None) -> None:
    global _worker_tok
    _worker_tok = load_tokenizer(spec, eos_id)


def _encode(items: list) -> list:
    return _encode_items(_worker_tok, items)


def _encode_items(tok, items: list) -> list:
    """Token ids for each text; any other item (a BadDocument, None, a number) comes back as it is."""
    texts = [t for t in items if isinstance(t, str)]
    ids = iter(tok.encode_batch(texts) if texts else [])
    return [next(ids) if isinstance(t, str) else t for t in items]


# --------------------------------------------------------------------------------------------- the writer
def prepare_documents(texts: Iterable, out_dir: str | os.PathLike, tokenizer: str = "bytes",
                      shard_tokens: int = 1 << 26, workers: int = 1, eos_id: int | None = None,
                      progress: bool = True, inputs_id: dict | None = None, on_bad_document: str = "fail",
                      size: InputSize | None = None) -> Manifest:
    """Tokenise ``texts`` into shards under ``out_dir``; resumes a previous interrupted run of the same input.

    ``inputs_id`` describes the input (the CLI: its files with sizes and mtimes; the demo: its name, size and Python
    version). It is recorded, and a re-run on the same directory with another description is refused; None means
    unknown (nothing recorded, nothing compared). An item that is not a string (a :class:`BadDocument` from the
    CLI's reader, or None, a number...) is a bad document: ``on_bad_document="fail"`` raises
    :class:`BadDocumentError` naming it, leaving the directory as of its last completed shard; "skip" leaves it
    out and counts it in the manifest.

    ``progress``: a bar on stderr when it is a terminal. ``size``: the input's size, advanced by the reader of
    ``texts`` (:func:`moetrain.data.inputs.read_documents`); the bar then has a total and an ETA, and moves as the
    written documents' bytes or rows, not as far as the reader has read ahead for the workers.
    """
    if on_bad_document not in BAD_DOCUMENT_POLICIES:
        raise ValueError(f"on_bad_document must be one of {BAD_DOCUMENT_POLICIES}, got {on_bad_document!r}")
    tok = load_tokenizer(tokenizer, eos_id)  # before the directory exists: a bad --tokenizer leaves no trace
    out = Path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    state = _load_progress(out, tok, inputs_id)
    manifest = Manifest(tokenizer=state.get("tokenizer", tok.name), vocab_size=tok.vocab_size,
                        eos_id=int(tok.eos_id), dtype=dtype.name, shards=[ShardInfo(**s) for s in state["shards"]],
                        tokenizer_fingerprint=state.get("tokenizer_fingerprint"), inputs=state.get("inputs"),
                        skipped_documents=state.get("skipped_documents", 0),
                        skipped_examples=list(state.get("skipped_examples", [])))
    if state["done"]:
        return manifest
    docs_done = state["documents"]  # input documents consumed, skipped ones included
    remaining = itertools.islice(iter(texts), docs_done, None)
    read_at = deque()  # size.read after each batch: the workers' feeder reads ahead of the written documents
    batches = _batches(remaining, _BATCH_DOCS, lambda: read_at.append(size.read if size else None))
    writer, t0, tokens_done = None, time.perf_counter(), 0
    # disable=None: no bar when stderr is not a terminal (logs, pipes), where it would only add lines
    counted = dict(total=size.total, unit=size.unit, unit_scale=size.unit == "B") if size else \
        dict(unit=" docs", initial=docs_done)
    bar = tqdm(desc="prepare-data", disable=None if progress else True, file=sys.stderr, **counted)

    def close_shard():
        nonlocal writer
        name = writer.prefix.name
        writer.finalize()
        manifest.shards.append(ShardInfo(name, len(writer.lengths), writer.n_tokens,
                                         sha256_file(out / f"{name}.bin"), sha256_file(out / f"{name}.idx")))
        _save_progress(out, manifest, docs_done, done=False)
        writer = None

    def bad_document(item):
        bad = item if isinstance(item, BadDocument) else \
            BadDocument(f"document {docs_done}", f"{type(item).__name__}, not a string")
        if on_bad_document == "fail":
            raise BadDocumentError(str(bad))
        manifest.skipped_documents += 1
        if len(manifest.skipped_examples) < _SKIPPED_EXAMPLES:
            manifest.skipped_examples.append(str(bad))

    ctx = get_context("spawn")
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer, eos_id)) if workers > 1 else None
    try:
        encoded = pool.imap(_encode, batches) if pool else (_encode_items(tok, b) for b in batches)
        for docs in encoded:
            for ids in docs:
                docs_done += 1
                if not isinstance(ids, np.ndarray):
                    bad_document(ids)
                    continue
                if writer is None:
                    writer = ShardWriter(out / f"shard_{len(manifest.shards):05d}", dtype)
                writer.add_document(np.append(ids, tok.eos_id))
                tokens_done += len(ids) + 1
                if writer.n_tokens >= shard_tokens:
                    close_shard()
            read = read_at.popleft()
            bar.update(len(docs) if read is None else read - bar.n)
            bar.set_postfix(shards=len(manifest.shards),
                            tokens_per_s=f"{tokens_done / max(time.perf_counter() - t0, 1e-9) / 1e6:.2f}M")
        if writer is not None and writer.lengths:
            close_shard()
        if not manifest.shards:
            skipped = f" ({manifest.skipped_documents} bad documents skipped)" if manifest.skipped_documents else ""
            raise PrepareError(f"no documents in the input{skipped}: nothing to write to {out}")
    except BaseException:
        _leave_resumable(out, writer, created)
        raise
    finally:
        if pool:
            pool.terminate()
        bar.close()
    _save_progress(out, manifest, docs_done, done=True)
    return manifest


def _leave_resumable(out: Path, writer: ShardWriter | None, created: bool) -> None:
    """After a failure: drop the unfinished shard, and the output directory if this run made it and it is empty."""
    if writer is not None:
        writer.abandon()
    if created and not any(out.iterdir()):
        out.rmdir()


def _batches(it: Iterator, n: int, after_each=lambda: None) -> Iterator[list]:
    while batch := list(itertools.islice(it, n)):
        after_each()
        yield batch


def _load_progress(out: Path, tok, inputs_id: dict | None) -> dict:
    path = out / PROGRESS
    if not path.exists():
        foreign = [f.name for f in out.iterdir() if not f.name.endswith(".tmp")]
        if foreign:  # never overwrite data that this tool did not start writing
            raise FileExistsError(f"--output {out} already holds {foreign[:3]} and no {PROGRESS}; "
                                  "choose an empty or new directory")
        for stale in out.glob("*.tmp"):  # left by a run that died before its first shard completed
            stale.unlink()
        return {"documents": 0, "shards": [], "done": False, "tokenizer": tok.name,
                "tokenizer_fingerprint": tok.fingerprint, "inputs": inputs_id}
    try:
        state = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise PrepareError(f"{path}: unreadable ({e}); use a new --output directory") from e
    if not isinstance(state, dict) or not {"tokenizer", "documents", "done", "shards"} <= set(state):
        raise PrepareError(f"{path}: not a prepare-data progress file; use a new --output directory")
    _check_same_run(path, state, tok, inputs_id)  # before anything in the directory is touched
    complete = {s["name"] for s in state["shards"]}
    for f in out.glob("shard_*"):  # a shard being written when the run stopped is discarded
        if f.name.split(".")[0] not in complete or f.suffix in (".tmp", ".part"):
            f.unlink()
    return state


def _check_same_run(path: Path, state: dict, tok, inputs_id: dict | None) -> None:
    """Refuse to add to (or to call finished) a directory made from another tokenizer or other inputs.

    Progress files written before fingerprints were recorded compare the tokenizer by name, and no inputs.
    """
    fingerprint = state.get("tokenizer_fingerprint")
    same = fingerprint == tok.fingerprint if fingerprint else state["tokenizer"] == tok.name
    if not same:
        raise PrepareError(f"{path}: this directory was prepared with tokenizer {state['tokenizer']!r} "
                           f"(fingerprint {fingerprint}), not {tok.name!r} (fingerprint {tok.fingerprint}); "
                           "use a new --output directory")
    if state.get("eos_id", tok.eos_id) != tok.eos_id:
        raise PrepareError(f"{path}: this directory was prepared with EOS id {state['eos_id']}, not {tok.eos_id}; "
                           "use a new --output directory")
    before = state.get("inputs")
    try:
        difference = inputs_difference(before, inputs_id) if before is not None and inputs_id is not None else None
    except (KeyError, TypeError, AttributeError):  # a damaged record cannot vouch for the data either
        difference = f"the earlier run's input record {str(before)[:60]!r} is unreadable"
    if difference:
        raise PrepareError(f"{path}: {difference}; this directory holds data of the earlier input: "
                           "use a new --output directory")


def _save_progress(out: Path, manifest: Manifest, documents: int, done: bool) -> None:
    manifest.save(out)
    tmp = out / (PROGRESS + ".tmp")
    tmp.write_text(json.dumps({"documents": documents, "done": done, **asdict(manifest)}))
    os.replace(tmp, out / PROGRESS)


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moetrain prepare-data", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="json/jsonl/parquet/text files, or a saved datasets directory")
    p.add_argument("--output", required=True, help="dataset directory to write (manifest.json + shards)")
    p.add_argument("--tokenizer", default="bytes", help="'bytes' or a local Hugging Face tokenizer directory")
    p.add_argument("--eos-id", type=int, default=None)
    p.add_argument("--text-key", default="text")
    p.add_argument("--format", default=None, choices=["json", "parquet", "text"])
    p.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard (default 64M)")
    # The CPUs this process may use (a Slurm job's --cpus-per-task, taskset), not the machine's; one for the writer.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)  # macOS
    p.add_argument("--workers", type=int, default=max(1, cpus - 1))
    p.add_argument("--on-bad-document", default="fail", choices=BAD_DOCUMENT_POLICIES,
                   help="a malformed line, non-UTF-8 bytes, a null or non-string text: fail (default, naming "
                        "file and line) or skip it (counted and reported)")
    args = p.parse_args(argv)
    try:
        check_inputs(args.inputs, args.format)
        size = input_size(args.inputs, args.format)
        m = prepare_documents(read_documents(args.inputs, args.text_key, args.format, size), args.output,
                              args.tokenizer, args.shard_tokens, args.workers, args.eos_id,
                              inputs_id=describe_inputs(args.inputs, args.text_key, args.format),
                              on_bad_document=args.on_bad_document, size=size)
    except (PrepareError, InputError, FileExistsError, FileNotFoundError) as e:
        hint = " (pass --on-bad-document=skip to leave bad documents out)" if isinstance(e, BadDocumentError) else ""
        print(f"prepare-data: error: {' '.join(str(e).split())}{hint}", file=sys.stderr)  # one line, no traceback
        return EXIT_BAD_INPUT
    print(_summary(m, args.output))
    return 0


def _summary(m: Manifest, output: str) -> str:
    line = (f"prepare-data: {sum(s.documents for s in m.shards)} documents, {sum(s.tokens for s in m.shards)} "
            f"tokens in {len(m.shards)} shards -> {output}")
    if m.skipped_documents:
        line += f"; skipped {m.skipped_documents} bad documents (first: {'; '.join(m.skipped_examples)})"
    return line


if __name__ == "__main__":
    sys.exit(main())
