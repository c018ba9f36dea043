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
    """Read-only view of one shard: ``tokens`` (a memory map of .bin) and its document boundaries."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = Path(prefix)
        idx_path, bin_path = self.prefix.with_suffix(".idx"), self.prefix.with_suffix(".bin")
        for p in (idx_path, bin_path):
            if not p.exists():
                raise ShardError(f"{p}: missing shard file")
        raw = np.memmap(idx_path, dtype=np.uint8, mode="r")
        if len(raw) < _HEADER.size:
            raise ShardError(f"{idx_path}: truncated header ({len(raw)} bytes)")
        magic, version, code, n_seq, n_doc = _HEADER.unpack(bytes(raw[:_HEADER.size]))
        if magic != MAGIC:
            raise ShardError(f"{idx_path}: bad magic {magic!r}, not a Megatron indexed dataset")
        if version != VERSION:
            raise ShardError(f"{idx_path}: unsupported index version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise ShardError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER.size + n_seq * 4 + n_seq * 8 + n_doc * 8
        if len(raw) < expected:
            raise ShardError(f"{idx_path}: truncated: {len(raw)} bytes, the header promises {expected}")
        off = _HEADER.size
        self.lengths = np.frombuffer(raw, dtype=np.int32, count=n_seq, offset=off)
        self.offsets = np.frombuffer(raw, dtype=np.int64, count=n_seq, offset=off + 4 * n_seq)
        self.document_indices = np.frombuffer(raw, dtype=np.int64, count=n_doc, offset=off + 12 * n_seq)
        bin_bytes = bin_path.stat().st_size
        if bin_bytes % self.dtype.itemsize:
            raise ShardError(f"{bin_path}: size {bin_bytes} is not a multiple of the token size {self.dtype.itemsize}")
        end = int(self.offsets[-1]) + int(self.lengths[-1]) * self.dtype.itemsize if n_seq else 0
        if end > bin_bytes or (n_seq and (self.lengths < 0).any()):
            raise ShardError(f"{idx_path}: the index points past the end of {bin_path.name} "
                             f"({end} > {bin_bytes} bytes): truncated .bin?")
        # A plain ndarray over the memory map: same lazily-read pages, without np.memmap's per-slice overhead.
        self.tokens = np.asarray(np.memmap(bin_path, dtype=self.dtype, mode="r")) if bin_bytes \
            else np.zeros(0, self.dtype)
        self.n_tokens = end // self.dtype.itemsize

    def __len__(self) -> int:
        return len(self.lengths)

    def document(self, i: int) -> np.ndarray:
        start = int(self.offsets[i]) // self.dtype.itemsize
        return np.asarray(self.tokens[start:start + int(self.lengths[i])])
