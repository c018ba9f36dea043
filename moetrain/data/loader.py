"""Deterministic, exactly resumable loading of fixed-length samples packed across documents.

A source's token stream is cut into samples of ``seq_len + 1`` tokens (sample i starts at token ``i * seq_len``),
so a sample's inputs and labels are its first and last ``seq_len`` tokens. The global order of training samples
is a pure function of (seed, epoch, index), also for weighted blends of several sources; an optimizer step takes
the next ``global_batch`` samples of that order and data-parallel rank r reads the r-th contiguous slice of them.
The loader's whole state is the number of samples consumed (with the seed and blend it was made with), so a
resumed run continues exactly, with any number of data-parallel ranks.

Shapes: B sequences, T = seq_len.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from moetrain.model.transformer import IGNORE_INDEX


@dataclass
class Batch:
    # [B, T] token ids in the storage dtype (uint16 / int32) as read; :meth:`to` widens them to int64 on the
    # device, so that the host copy and the host-to-device transfer move 2-4 bytes per token, not 8.
    tokens: torch.Tensor
    labels: torch.Tensor  # [B, T], IGNORE_INDEX where there is no target
    eos_id: int | None = None
    n_targets: int = -1  # labels that are not IGNORE_INDEX, counted on the host when the batch is read

    def __post_init__(self):
        if self.n_targets < 0:  # NOTE: from the host copy: counting on the device would be a sync per batch
            self.n_targets = int((self.labels.numpy() != IGNORE_INDEX).sum()) if self.labels.device.type == "cpu" \
                else int((self.labels != IGNORE_INDEX).sum())

    def to(self, device) -> "Batch":
        return Batch(self.tokens.to(device, non_blocking=True).long(),
                     self.labels.to(device, non_blocking=True).long(), self.eos_id, self.n_targets)

    def document_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """doc_ids [B, T] and position_ids [B, T]; computed on demand (document masking only)."""
        return document_positions(self.tokens, self.eos_id)


class PackedSamples:
    """Samples of ``seq_len + 1`` tokens from a 1-D token sequence (numpy array, memory map, TokenDataset)."""

    def __init__(self, tokens, seq_len: int, eos_id: int | None, name: str = "data"):
        if len(tokens) < seq_len + 1:
            raise ValueError(f"{name}: {len(tokens)} tokens, fewer than train.seq_len + 1 = {seq_len + 1}")
        self.tokens, self.seq_len, self.eos_id, self.name = tokens, seq_len, eos_id, name
        self.n_samples = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.n_samples

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """[len(indices), seq_len + 1] in the storage dtype, one slice copy per row."""
        starts = np.asarray(indices, dtype=np.int64) * self.seq_len
        if hasattr(self.tokens, "gather"):
            return self.tokens.gather(starts, self.seq_len + 1)
        return np.asarray(self.tokens[starts[:, None] + np.arange(self.seq_len + 1)])


def make_batch(rows_BT1: np.ndarray, eos_id: int | None) -> Batch:
    seq = torch.from_numpy(rows_BT1)
    return Batch(seq[:, :-1], seq[:, 1:], eos_id)


def document_positions(tokens_BT: torch.Tensor, eos_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Document index and position within the document; a new document starts after every EOS."""
    B, T = tokens_BT.shape
    pos = torch.arange(T, device=tokens_BT.device).expand(B, T)
    if eos_id is None:
        return torch.zeros(B, T, dtype=torch.long, device=tokens_BT.device), pos.contiguous()
    starts = torch.zeros(B, T, dtype=torch.long, device=tokens_BT.device)
    starts[:, 1:] = (tokens_BT[:, :-1] == eos_id).long()
    first = torch.where(starts.bool(), pos, torch.zeros_like(pos)).cummax(1).values
    return starts.cumsum(1), (pos - first).contiguous()


def sample_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of one source's samples in epoch ``epoch``: a pure function of (seed, epoch)."""
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)


class Blend:
    """Global sample index -> (source, sample) for weighted sources, as a pure function of (seed, index).

    Indices come in blocks of ``BLOCK``; every block holds a fixed quota of samples of each source (the weights'
    largest-remainder rounding) in a seeded order, so source s's k-th sample is found without counting from 0.
    Within a source, samples follow that source's epoch permutations (:func:`sample_order`).
    """

    BLOCK = 1024

    def __init__(self, ranges: list[tuple[int, int]], weights: list[float], seed: int):
        if len(ranges) != len(weights) or not ranges or min(weights) <= 0:
            raise ValueError("data.weights: need one positive weight per data path")
        self.ranges, self.seed = ranges, seed
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        quota = np.floor(w * self.BLOCK).astype(np.int64)
        quota[np.argsort(-(w * self.BLOCK - quota), kind="stable")[: self.BLOCK - quota.sum()]] += 1
        self.quota = quota
        self._block: tuple[int, np.ndarray, np.ndarray] | None = None
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def _layout(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if self._block is None or self._block[0] != b:
            src = np.repeat(np.arange(len(self.quota)), self.quota)
            if len(self.quota) > 1:
                src = np.random.Generator(np.random.PCG64([self.seed, 1 << 32, b])).permutation(src)
            rank = np.zeros(self.BLOCK, dtype=np.int64)
            for s in range(len(self.quota)):
                rank[src == s] = np.arange(self.quota[s])
            self._block = (b, src, rank)
        return self._block[1], self._block[2]

    def lookup_many(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, sample) arrays of global indices start .. start + count - 1."""
        if len(self.quota) == 1:  # one source: the block layout is the identity, index k is sample k
            lo, hi = self.ranges[0]
            epochs, k = np.divmod(np.arange(start, start + count), hi - lo)
            sample = np.empty(count, np.int64)
            for e in _distinct(epochs):
                at = epochs == e
                sample[at] = lo + self._order(0, int(e), hi - lo)[k[at]]
            return np.zeros(count, np.int64), sample
        src_out, sample_out = np.empty(count, np.int64), np.empty(count, np.int64)
        i = start
        while i < start + count:
            b, j = divmod(i, self.BLOCK)
            n = min(self.BLOCK - j, start + count - i)
            src, rank = self._layout(b)
            src, rank = src[j:j + n], rank[j:j + n]
            out = slice(i - start, i - start + n)
            src_out[out] = src
            for s in _distinct(src):
                mask = slice(None) if len(self.quota) == 1 else src == s
                lo, hi = self.ranges[s]
                epochs, k = np.divmod(b * int(self.quota[s]) + rank[mask], hi - lo)
                picked = np.empty(len(k), np.int64)
                for e in _distinct(epochs):
                    at = slice(None) if epochs[0] == epochs[-1] else epochs == e
                    picked[at] = self._order(int(s), int(e), hi - lo)[k[at]]
                sample_out[out][mask] = lo + picked
            i += n
        return src_out, sample_out

    def _order(self, s: int, epoch: int, n: int) -> np.ndarray:
        if (s, epoch) not in self._orders:
            self._orders = {key: v for key, v in self._orders.items() if key[0] != s or key[1] > epoch - 2}
            self._orders[(s, epoch)] = sample_order(n, self.seed + s, epoch)
        return self._orders[(s, epoch)]


class DataLoader:
    """Hands each data-parallel rank its micro-batches of every optimizer step, in the global order.

    With ``prefetch`` the next step's batches are read on a background thread while this step computes.
    """

    def __init__(self, sources: list[PackedSamples], train_ranges: list[tuple[int, int]], weights: list[float],
                 seed: int, dp_rank: int, dp_size: int, micro_batch_size: int, blend_id: list | None = None,
                 prefetch: bool = True):
        self.sources, self.seed = sources, seed
        self.blend = Blend(train_ranges, weights, seed)
        self.blend_id = blend_id or [[s.name, w] for s, w in zip(sources, weights)]
        self.dp_rank, self.dp_size, self.micro = dp_rank, dp_size, micro_batch_size
        self.eos_id = sources[0].eos_id
        self.consumed = 0  # global samples consumed: the loader's whole state
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="data-prefetch") if prefetch else None
        self._ahead: tuple[int, int, Future] | None = None

    def _read(self, start: int, global_batch: int) -> list[Batch]:
        per_rank = global_batch // self.dp_size
        return read_batches(self.sources, self.blend, start + self.dp_rank * per_rank, per_rank, self.micro)

    def next_step(self, global_batch: int) -> list[Batch]:
        """This rank's micro-batches of the next optimizer step of ``global_batch`` sequences."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:2] == (self.consumed, global_batch):
            batches = ahead[2].result()
        else:
            batches = self._read(self.consumed, global_batch)
        self.consumed += global_batch
        return batches

    def prefetch(self, global_batch: int) -> None:
        """Start reading the step after this one (``global_batch`` sequences) in the background."""
        if self._pool is not None:
            self._ahead = (self.consumed, global_batch, self._pool.submit(self._read, self.consumed, global_batch))

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "blend": self.blend_id}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"data.seed: the checkpoint's loader used seed {state['seed']}, this run {self.seed}")
        if [list(b) for b in state["blend"]] != [list(b) for b in self.blend_id]:
            raise ValueError(f"data.paths/data.weights: the checkpoint's blend {state['blend']} differs from "
                             f"this run's {self.blend_id}")
        self.consumed, self._ahead = int(state["consumed"]), None


def read_batches(sources: list[PackedSamples], blend: Blend, start: int, count: int, micro: int) -> list[Batch]:
    """The ``count`` samples of ``blend`` from position ``start`` (rows of its sources, in blend order), as
    micro-batches of ``micro``."""
    src, sample = blend.lookup_many(start, count)
    if len(sources) == 1:
        rows = sources[0].rows(sample)
    else:
        rows = np.empty((count, sources[0].seq_len + 1), dtype=np.int64)  # sources may differ in dtype
        for s in _distinct(src):
            rows[src == s] = sources[s].rows(sample[src == s])
    return [make_batch(rows[i:i + micro], sources[0].eos_id) for i in range(0, count, micro)]


def _distinct(values: np.ndarray) -> list[int]:
    """Distinct values of a small int array; the common single-valued case without sorting."""
    if len(values) == 0:
        return []
    if values.min() == values.max():
        return [int(values[0])]
    return np.unique(values).tolist()


def split_ranges(n_samples: int, val_fraction: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """Training samples first, the held-out validation samples are the tail."""
    n_val = int(n_samples * val_fraction)
    return (0, n_samples - n_val), (n_samples - n_val, n_samples)
