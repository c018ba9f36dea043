"""A prepared dataset: ``manifest.json`` plus Megatron-layout shards, read as one token stream.

Local directories are memory-mapped in place. Remote ones (any fsspec URL: s3://, gs://, https://, file://) are
copied shard by shard into a local cache on first use, and the next shards are fetched in the background while
the current one is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from bisect import bisect_right
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from moetrain.data.indexed import IndexedShard, ShardError

MANIFEST = "manifest.json"
_READ_AHEAD = 2  # shards fetched ahead of the one being read (remote datasets)


@dataclass
class ShardInfo:
    name: str  # file prefix: <name>.bin / <name>.idx
    documents: int
    tokens: int
    sha256_bin: str
    sha256_idx: str


@dataclass
class Manifest:
    tokenizer: str
    vocab_size: int
    eos_id: int
    dtype: str
    shards: list[ShardInfo] = field(default_factory=list)
    format: str = "megatron-mmidx-v1"

    def save(self, directory: Path) -> None:
        tmp = directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, directory / MANIFEST)

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        try:
            raw = json.loads(text)
            raw["shards"] = [ShardInfo(**s) for s in raw["shards"]]
            return cls(**raw)
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ShardError(f"{where}: not a moetrain manifest ({e})") from e


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _is_url(path: str) -> bool:
    return "://" in path


class TokenDataset:
    """The concatenated tokens of every shard, indexable by slices (shards opened lazily)."""

    def __init__(self, path: str, model_vocab_size: int | None = None, cache_dir: str | None = None,
                 verify_checksums: bool = True):
        self.path, self.verify = path, verify_checksums
        self.remote = _is_url(path)
        if self.remote:
            import fsspec

            self._fs, self._root = fsspec.core.url_to_fs(path)
            key = hashlib.sha256(path.encode()).hexdigest()[:16]
            self.local_dir = Path(cache_dir or Path.home() / ".cache" / "moetrain" / "shards") / key
            self.local_dir.mkdir(parents=True, exist_ok=True)
            text = self._fs.cat_file(f"{self._root.rstrip('/')}/{MANIFEST}").decode()
        else:
            self.local_dir = Path(path)
            manifest_path = self.local_dir / MANIFEST
            if not manifest_path.exists():
                raise FileNotFoundError(f"{manifest_path} not found: prepare the data with `moetrain prepare-data`")
            text = manifest_path.read_text()
        self.manifest = Manifest.from_json(text, f"{path}/{MANIFEST}")
        if model_vocab_size is not None and self.manifest.vocab_size > model_vocab_size:
            raise ShardError(f"{path}/{MANIFEST}: vocab_size {self.manifest.vocab_size} (tokenizer "
                             f"{self.manifest.tokenizer}) is larger than model.vocab_size={model_vocab_size}")
        sizes = [s.tokens for s in self.manifest.shards]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n_tokens = int(self.starts[-1])
        self.eos_id = self.manifest.eos_id
        self._shards: dict[int, IndexedShard] = {}
        self._fetches: dict[int, Future] = {}
        self._lock = threading.RLock()  # shard() holds it while _open() schedules the fetch
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-fetch") if self.remote else None

    def __len__(self) -> int:
        return self.n_tokens

    def __getitem__(self, s: slice) -> np.ndarray:
        start, stop, _ = s.indices(self.n_tokens)
        parts = []
        while start < stop:
            i = bisect_right(self.starts, start) - 1
            shard = self.shard(i)
            lo = start - int(self.starts[i])
            take = min(stop - start, shard.n_tokens - lo)
            parts.append(np.asarray(shard.tokens[lo:lo + take]))
            start += take
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def gather(self, starts: np.ndarray, length: int) -> np.ndarray:
        """[len(starts), length] rows in the token dtype; each row is one slice copy out of a shard's memory map."""
        out = np.empty((len(starts), length), dtype=np.dtype(self.manifest.dtype))
        shard_of = np.searchsorted(self.starts, starts, side="right") - 1
        local = (starts - self.starts[shard_of]).tolist()
        for r, i in enumerate(shard_of.tolist()):
            shard = self._shards.get(i) or self.shard(i)
            lo = local[r]
            if lo + length <= shard.n_tokens:
                out[r] = shard.tokens[lo:lo + length]
            else:  # the span crosses into the next shard
                out[r] = self[int(starts[r]):int(starts[r]) + length]
        return out

    def shard(self, i: int) -> IndexedShard:
        if i not in self._shards:
            with self._lock:
                if i not in self._shards:
                    self._shards[i] = self._open(i)
        if self.remote:
            for j in range(i + 1, min(i + 1 + _READ_AHEAD, len(self.manifest.shards))):
                self._prefetch(j)
        return self._shards[i]

    def _open(self, i: int) -> IndexedShard:
        info = self.manifest.shards[i]
        if self.remote:
            self._prefetch(i).result()
        prefix = self.local_dir / info.name
        shard = IndexedShard(prefix)  # structural checks first: they say what is wrong
        if self.verify:
            for suffix, digest in ((".bin", info.sha256_bin), (".idx", info.sha256_idx)):
                p = prefix.with_suffix(suffix)
                if sha256_file(p) != digest:
                    raise ShardError(f"{p}: checksum mismatch with {MANIFEST} (corrupt or replaced shard)")
        if shard.n_tokens != info.tokens or len(shard) != info.documents:
            raise ShardError(f"{prefix}.idx: {len(shard)} documents / {shard.n_tokens} tokens, but {MANIFEST} "
                             f"says {info.documents} / {info.tokens}")
        return shard

    def _prefetch(self, i: int) -> Future:
        with self._lock:
            if i not in self._fetches:
                self._fetches[i] = self._pool.submit(self._fetch, self.manifest.shards[i].name)
            return self._fetches[i]

    def _fetch(self, name: str) -> None:
        """Copy one remote shard into the cache (atomically; an existing complete copy is reused)."""
        for suffix in (".idx", ".bin"):
            dst = self.local_dir / (name + suffix)
            if dst.exists():
                continue
            tmp = dst.with_suffix(suffix + ".part")
            self._fs.get_file(f"{self._root.rstrip('/')}/{name}{suffix}", str(tmp))
            os.replace(tmp, dst)
