"""A prepared dataset: ``manifest.json`` plus Megatron-layout shards, read as one token stream.

Local directories are memory-mapped in place. Remote ones (any fsspec URL: s3://, gs://, https://, file://) are
copied shard by shard into a local cache on first use, and the next shards are fetched in the background while
the current one is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from bisect import bisect_right
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from moetrain.data.indexed import DTYPE_CODES, IndexedShard, ShardError

MANIFEST = "manifest.json"
FORMAT = "megatron-mmidx-v1"
# Shard names become file names under the dataset (or, for remote datasets, the cache) directory: plain names
# only, so that a manifest cannot make a reader open, or a fetch write, anything outside it.
SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,199}")  # no dots either: readers add .bin / .idx
_SHA256 = re.compile(r"[0-9a-f]{64}")
TOKEN_DTYPES = {np.dtype(t).name for t in DTYPE_CODES.values() if np.dtype(t).kind in "iu"}
_MAX_COUNT = 1 << 62  # counts are summed into int64 offsets
_PROVENANCE_KEYS = {"tokenizer_fingerprint", "inputs", "skipped_documents", "skipped_examples"}  # newer than v1
_READ_AHEAD = 2  # shards fetched ahead of the one being read (remote datasets)


@dataclass
class ShardInfo:
    name: str  # file prefix: <name>.bin / <name>.idx; a plain file name (see SHARD_NAME)
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
    format: str = FORMAT
    # Provenance (absent from manifests written before them: None means unknown). The fingerprint is a hash of
    # the tokenizer's files, so blends and resumed preparation compare tokenizers, not their path strings.
    tokenizer_fingerprint: str | None = None
    inputs: dict | None = None  # what prepare-data read (files with sizes and mtimes, or a description)
    skipped_documents: int = 0  # bad input documents left out (prepare-data --on-bad-document=skip)
    skipped_examples: list[str] = field(default_factory=list)  # where the first few of them were

    def save(self, directory: Path) -> None:
        tmp = directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, directory / MANIFEST)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> "Manifest":
        """Parse and check every field, so a damaged or hostile manifest fails here, naming the key."""
        try:
            raw = json.loads(text)
        except ValueError as e:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
            raise ShardError(f"{where}: not a moetrain manifest ({e})") from e
        if not isinstance(raw, dict):
            raise ShardError(f"{where}: not a moetrain manifest (a JSON {type(raw).__name__}, not an object)")
        _check_keys(raw, Manifest, where, "")
        if raw["format"] != FORMAT:
            raise ShardError(f"{where}: format {_short(raw['format'])}, expected {FORMAT!r}")
        for key in ("vocab_size", "eos_id", "skipped_documents"):
            _check_count(raw, key, where, "")
        if raw["vocab_size"] == 0 or raw["eos_id"] >= raw["vocab_size"]:
            raise ShardError(f"{where}: eos_id {raw['eos_id']} is not below vocab_size {raw['vocab_size']}")
        if raw["dtype"] not in TOKEN_DTYPES:
            raise ShardError(f"{where}: dtype {_short(raw['dtype'])} is not one of {sorted(TOKEN_DTYPES)}")
        for key, kind in (("tokenizer_fingerprint", (str, type(None))), ("inputs", (dict, type(None))),
                          ("skipped_examples", list)):
            if not isinstance(raw[key], kind):
                raise ShardError(f"{where}: {key} {_short(raw[key])} has the wrong type")
        if not all(isinstance(x, str) for x in raw["skipped_examples"]):
            raise ShardError(f"{where}: skipped_examples {_short(raw['skipped_examples'])} holds a non-string")
        if not isinstance(raw["shards"], list):
            raise ShardError(f"{where}: shards {_short(raw['shards'])} is not a list")
        raw["shards"] = [_shard_info(s, where, f"shards[{i}].") for i, s in enumerate(raw["shards"])]
        names = [s.name for s in raw["shards"]]
        if len(set(names)) != len(names):
            raise ShardError(f"{where}: shard {next(n for n in names if names.count(n) > 1)!r} is listed twice")
        return cls(**raw)


def _shard_info(raw, where: str, at: str) -> ShardInfo:
    if not isinstance(raw, dict):
        raise ShardError(f"{where}: {at[:-1]} {_short(raw)} is not an object")
    _check_keys(raw, ShardInfo, where, at)
    if not isinstance(raw["name"], str) or not SHARD_NAME.fullmatch(raw["name"]):
        raise ShardError(f"{where}: {at}name {_short(raw['name'])} is not a plain file name (letters, digits, "
                         f"'_', '-'; no path separators, dots or absolute paths)")
    for key in ("documents", "tokens"):
        _check_count(raw, key, where, at)
        if raw[key] == 0:  # prepare-data never writes an empty shard, and a reader would never open one
            raise ShardError(f"{where}: {at}{key} is 0: an empty shard")
    for key in ("sha256_bin", "sha256_idx"):
        if not isinstance(raw[key], str) or not _SHA256.fullmatch(raw[key]):
            raise ShardError(f"{where}: {at}{key} {_short(raw[key])} is not a sha256 hex digest")
    return ShardInfo(**raw)


def _check_keys(raw: dict, schema, where: str, at: str) -> None:
    """No unknown keys; every key present but the provenance ones, which older manifests lack (defaults fill in)."""
    known = {f.name: f for f in fields(schema)}
    for key in raw:
        if key not in known:
            raise ShardError(f"{where}: unknown key {at}{_short(key)}")
    for key, f in known.items():
        if key not in raw:
            if key not in _PROVENANCE_KEYS:
                raise ShardError(f"{where}: missing key {at}{key}")
            raw[key] = f.default if f.default is not MISSING else f.default_factory()


def _check_count(raw: dict, key: str, where: str, at: str) -> None:
    value = raw[key]
    if type(value) is not int or not 0 <= value < _MAX_COUNT:  # type(): a JSON true is not a count
        raise ShardError(f"{where}: {at}{key} {_short(value)} is not an integer in [0, 2**62)")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
            text = self._fs.cat_file(f"{self._root.rstrip('/')}/{MANIFEST}")
        else:
            self.local_dir = Path(path)
            manifest_path = self.local_dir / MANIFEST
            if not manifest_path.exists():
                raise FileNotFoundError(f"{manifest_path} not found: prepare the data with `moetrain prepare-data`")
            text = manifest_path.read_bytes()
        self.manifest = Manifest.from_json(text, f"{path}/{MANIFEST}")
        if model_vocab_size is not None and self.manifest.vocab_size > model_vocab_size:
            raise ShardError(f"{path}/{MANIFEST}: vocab_size {self.manifest.vocab_size} (tokenizer "
                             f"{self.manifest.tokenizer}) is larger than model.vocab_size={model_vocab_size}")
        sizes = [s.tokens for s in self.manifest.shards]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n_tokens = int(self.starts[-1])
        self.eos_id = self.manifest.eos_id
        self.dtype = np.dtype(self.manifest.dtype)
        # Token ids are checked against the vocabulary as they are read (one max over a batch): a flipped bit in
        # an unverified shard must fail here, naming the file, not index past the embedding table on a GPU.
        info = np.iinfo(self.dtype)
        self._ids_need_check = info.min < 0 or info.max >= self.manifest.vocab_size
        self._shards: dict[int, IndexedShard] = {}
        self._fetches: dict[int, Future] = {}
        self._lock = threading.RLock()  # shard() holds it while _open() schedules the fetch
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-fetch") if self.remote else None

    def __len__(self) -> int:
        return self.n_tokens

    def __getitem__(self, s: slice) -> np.ndarray:
        start, stop, _ = s.indices(self.n_tokens)
        first, parts = start, []
        while start < stop:
            i = bisect_right(self.starts, start) - 1
            shard = self.shard(i)
            lo = start - int(self.starts[i])
            take = min(stop - start, shard.n_tokens - lo)
            parts.append(np.asarray(shard.tokens[lo:lo + take]))
            start += take
        tokens = np.concatenate(parts) if len(parts) > 1 else parts[0] if parts else np.zeros(0, self.dtype)
        if self._ids_need_check and not self._ids_in_range(tokens):
            self._raise_bad_id(first + int(np.argmax(self._bad_ids(tokens))), tokens)
        return tokens

    def gather(self, starts: np.ndarray, length: int) -> np.ndarray:
        """[len(starts), length] rows in the token dtype; each row is one slice copy out of a shard's memory map."""
        out = np.empty((len(starts), length), dtype=self.dtype)
        shard_of = np.searchsorted(self.starts, starts, side="right") - 1
        local = (starts - self.starts[shard_of]).tolist()
        for r, i in enumerate(shard_of.tolist()):
            shard = self._shards.get(i) or self.shard(i)
            lo = local[r]
            if lo + length <= shard.n_tokens:
                out[r] = shard.tokens[lo:lo + length]
            else:  # the span crosses into the next shard
                out[r] = self[int(starts[r]):int(starts[r]) + length]
        if self._ids_need_check and not self._ids_in_range(out):
            r, c = np.unravel_index(int(np.argmax(self._bad_ids(out))), out.shape)
            self._raise_bad_id(int(starts[r]) + int(c), out[r])
        return out

    def _ids_in_range(self, tokens: np.ndarray) -> bool:
        return not tokens.size or (int(tokens.max()) < self.manifest.vocab_size and int(tokens.min()) >= 0)

    def _bad_ids(self, tokens: np.ndarray) -> np.ndarray:
        return (tokens < 0) | (tokens >= self.manifest.vocab_size)

    def _raise_bad_id(self, position: int, tokens: np.ndarray) -> None:
        i = bisect_right(self.starts, position) - 1
        value = int(tokens.reshape(-1)[np.argmax(self._bad_ids(tokens.reshape(-1)))])
        raise ShardError(f"{self.local_dir / self.manifest.shards[i].name}.bin: token id {value} at token "
                         f"{position - int(self.starts[i])} is outside the vocabulary (vocab_size "
                         f"{self.manifest.vocab_size} in {MANIFEST}): a corrupt shard")

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
        for suffix in (".idx", ".bin"):
            if not prefix.with_suffix(suffix).exists():
                raise ShardError(f"{prefix}{suffix}: missing, but {MANIFEST} lists shard {info.name!r}")
        shard = IndexedShard(prefix)  # structural checks first: they say what is wrong
        if shard.dtype != self.dtype:
            raise ShardError(f"{prefix}.idx: token dtype {shard.dtype}, but {MANIFEST} says {self.dtype}")
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
