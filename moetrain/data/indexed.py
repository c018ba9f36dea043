"""Token shards in Megatron-LM's indexed-dataset layout: ``<name>.bin`` (tokens) + ``<name>.idx`` (index).

``.idx`` layout (little-endian), so that data prepared by Megatron tools reads as is and vice versa:

    magic            9 bytes   b"MMIDIDX\\x00\\x00"
    version          uint64    1
    dtype code       uint8     1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    sequence count   uint64    S
    document count   uint64    D (document boundaries: D - 1 documents)
    sequence lengths int32[S]  tokens per sequence (here: one sequence per document)
    sequence offsets int64[S]  byte offset of each sequence in .bin
    document indices int64[D]  sequence index where each document starts, plus the end (0, ..., S)

Both files are read by memory map, so only the pages a sample touches are read.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")


class ShardError(ValueError):
    """A shard file is malformed; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65536), else uint32 stored as int32 (DeepSeek-V3's 129,280 ids)."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


class ShardWriter:
    """Appends documents to ``<prefix>.bin`` and writes ``<prefix>.idx`` on :meth:`finalize`.

    Files are written under temporary names and renamed only when complete, so a crash never leaves a shard that
    looks finished.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype):
        self.prefix, self.dtype = Path(prefix), np.dtype(dtype)
        self._bin_tmp = self.prefix.with_suffix(".bin.tmp")
        self._bin = open(self._bin_tmp, "wb")
        self.lengths: list[int] = []
        self.n_tokens = 0  # kept as documents arrive: prepare-data checks it after every document

    def add_document(self, tokens: np.ndarray) -> None:
        self._bin.write(np.asarray(tokens, dtype=self.dtype).tobytes())
        self.lengths.append(len(tokens))
        self.n_tokens += len(tokens)

    def abandon(self) -> None:
        """Drop the unfinished shard (its data never had a final name)."""
        self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)

    def finalize(self) -> tuple[Path, Path]:
        self._bin.close()
        lengths = np.array(self.lengths, dtype=np.int32)
        offsets = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths):
            offsets[1:] = np.cumsum(lengths[:-1].astype(np.int64)) * self.dtype.itemsize
        doc_index = np.arange(len(lengths) + 1, dtype=np.int64)
        idx_tmp = self.prefix.with_suffix(".idx.tmp")
        with open(idx_tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[self.dtype], len(lengths), len(doc_index)))
            f.write(lengths.tobytes())
            f.write(offsets.tobytes())
            f.write(doc_index.tobytes())
        bin_path, idx_path = self.prefix.with_suffix(".bin"), self.prefix.with_suffix(".idx")
        os.replace(self._bin_tmp, bin_path)
        os.replace(idx_tmp, idx_path)
        return bin_path, idx_path


class IndexedShard:
    """Read-only view of one shard: ``tokens`` (a memory map of .bin) and its document boundaries.

    Every structural fact the reader relies on is checked on open, so a damaged pair of files raises
    :class:`ShardError` naming the file rather than reading wrong tokens: the header, the exact .idx size, the
    sequences lying back to back from byte 0 to the end of .bin, and the document indices.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = Path(prefix)
        idx_path, bin_path = self.prefix.with_suffix(".idx"), self.prefix.with_suffix(".bin")
        for p in (idx_path, bin_path):
            if not p.exists():
                raise ShardError(f"{p}: missing shard file")
        idx_bytes = idx_path.stat().st_size
        if idx_bytes < _HEADER.size:  # also keeps np.memmap off an empty file (it cannot map 0 bytes)
            raise ShardError(f"{idx_path}: truncated header ({idx_bytes} bytes)")
        raw = np.memmap(idx_path, dtype=np.uint8, mode="r")
        magic, version, code, n_seq, n_doc = _HEADER.unpack(bytes(raw[:_HEADER.size]))
        if magic != MAGIC:
            raise ShardError(f"{idx_path}: bad magic {magic!r}, not a Megatron indexed dataset")
        if version != VERSION:
            raise ShardError(f"{idx_path}: unsupported index version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise ShardError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER.size + n_seq * 4 + n_seq * 8 + n_doc * 8
        if idx_bytes < expected:
            raise ShardError(f"{idx_path}: truncated: {idx_bytes} bytes, the header promises {expected}")
        if idx_bytes > expected:  # a damaged count would otherwise shift every array that follows it
            raise ShardError(f"{idx_path}: {idx_bytes} bytes, but its header ({n_seq} sequences, {n_doc} document "
                             f"indices) describes {expected}")
        off = _HEADER.size
        self.lengths = np.frombuffer(raw, dtype=np.int32, count=n_seq, offset=off)
        self.offsets = np.frombuffer(raw, dtype=np.int64, count=n_seq, offset=off + 4 * n_seq)
        self.document_indices = np.frombuffer(raw, dtype=np.int64, count=n_doc, offset=off + 12 * n_seq)
        bin_bytes = bin_path.stat().st_size
        if bin_bytes % self.dtype.itemsize:
            raise ShardError(f"{bin_path}: size {bin_bytes} is not a multiple of the token size {self.dtype.itemsize}")
        end = self._check_sequences(idx_path, bin_path, bin_bytes)
        self._check_documents(idx_path)
        # A plain ndarray over the memory map: same lazily-read pages, without np.memmap's per-slice overhead.
        self.tokens = np.asarray(np.memmap(bin_path, dtype=self.dtype, mode="r")) if bin_bytes \
            else np.zeros(0, self.dtype)
        self.n_tokens = end // self.dtype.itemsize

    def _check_sequences(self, idx_path: Path, bin_path: Path, bin_bytes: int) -> int:
        """The sequences tile .bin exactly (readers take the tokens as one stream); returns the end in bytes."""
        lengths, offsets, size = self.lengths.astype(np.int64), self.offsets, self.dtype.itemsize
        if (lengths < 0).any():
            i = int(np.argmax(lengths < 0))
            raise ShardError(f"{idx_path}: sequence {i} has a negative length {int(lengths[i])}")
        if (offsets < 0).any() or (offsets % size).any():
            i = int(np.argmax((offsets < 0) | (offsets % size != 0)))
            raise ShardError(f"{idx_path}: sequence {i} has offset {int(offsets[i])}, not a token boundary in "
                             f"{bin_path.name}")
        if not len(lengths):
            return 0
        # offsets first: once they are at most bin_bytes, adding the lengths cannot overflow int64
        ends = offsets + lengths * size if (offsets <= bin_bytes).all() else offsets
        if (ends > bin_bytes).any():
            i = int(np.argmax(ends > bin_bytes))
            raise ShardError(f"{idx_path}: the index points past the end of {bin_path.name} (sequence {i} reaches "
                             f"byte {int(ends[i])} > {bin_bytes} bytes): truncated .bin?")
        if offsets[0] != 0 or (offsets[1:] != ends[:-1]).any():
            i = 0 if offsets[0] != 0 else 1 + int(np.argmax(offsets[1:] != ends[:-1]))
            raise ShardError(f"{idx_path}: sequence {i} starts at byte {int(offsets[i])}, not where the one before "
                             f"it ends: a corrupt index")
        if int(ends[-1]) != bin_bytes:
            raise ShardError(f"{idx_path}: describes {int(ends[-1])} bytes of tokens, but {bin_path.name} holds "
                             f"{bin_bytes}")
        return int(ends[-1])

    def _check_documents(self, idx_path: Path) -> None:
        """Document indices run from 0 to the sequence count without going back (Megatron's contract)."""
        docs = self.document_indices
        if not len(docs) or docs[0] != 0 or docs[-1] != len(self.lengths) or (np.diff(docs) < 0).any():
            raise ShardError(f"{idx_path}: document indices {docs[:3].tolist()}...{docs[-2:].tolist()} do not run "
                             f"from 0 to the sequence count {len(self.lengths)} in order")

    def __len__(self) -> int:
        return len(self.lengths)

    def document(self, i: int) -> np.ndarray:
        start = int(self.offsets[i]) // self.dtype.itemsize
        return np.asarray(self.tokens[start:start + int(self.lengths[i])])
