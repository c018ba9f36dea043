"""Deterministic, exactly resumable loading of fixed-length samples packed across documents.

A token stream is cut into samples of ``seq_len + 1`` tokens (sample i starts at token ``i * seq_len``), so a
sample's inputs and labels are its first and last ``seq_len`` tokens. The global order of training samples is a
pure function of (seed, epoch, index); an optimizer step takes the next ``global_batch`` samples of that order
and data-parallel rank r reads the r-th contiguous slice of them. The loader's whole state is the number of
samples consumed, so a resumed run continues exactly, with any number of data-parallel ranks.

Shapes: B sequences, T = seq_len.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moetrain.model.transformer import IGNORE_INDEX


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64, IGNORE_INDEX where there is no target
    doc_ids: torch.Tensor  # [B, T] int64: index of the packed document within its sequence
    position_ids: torch.Tensor  # [B, T] int64: position within the document

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in (self.tokens, self.labels, self.doc_ids,
                                                                self.position_ids)))

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class PackedSamples:
    """Samples of ``seq_len + 1`` tokens from a 1-D token array (numpy array or memory map)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, eos_id: int | None):
        if len(tokens) < seq_len + 1:
            raise ValueError(f"the dataset has {len(tokens)} tokens, fewer than train.seq_len + 1 = {seq_len + 1}")
        self.tokens, self.seq_len, self.eos_id = tokens, seq_len, eos_id
        self.n_samples = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.n_samples

    def get(self, indices: np.ndarray) -> Batch:
        rows = np.stack([np.asarray(self.tokens[i * self.seq_len: i * self.seq_len + self.seq_len + 1])
                         for i in indices]).astype(np.int64)
        seq = torch.from_numpy(rows)
        tokens, labels = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
        doc_ids, position_ids = self._documents(tokens)
        return Batch(tokens, labels, doc_ids, position_ids)

    def _documents(self, tokens_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A new document starts after every EOS; positions restart there."""
        B, T = tokens_BT.shape
        if self.eos_id is None:
            return torch.zeros(B, T, dtype=torch.long), torch.arange(T).expand(B, T).contiguous()
        starts = torch.zeros(B, T, dtype=torch.long)
        starts[:, 1:] = (tokens_BT[:, :-1] == self.eos_id).long()
        doc_ids = starts.cumsum(1)
        pos = torch.arange(T).expand(B, T)
        first = torch.where(starts.bool(), pos, torch.zeros_like(pos)).cummax(1).values
        return doc_ids, (pos - first).contiguous()


def sample_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of epoch ``epoch``: a pure function of (seed, epoch)."""
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)


class DataLoader:
    """Hands each data-parallel rank its micro-batches of every optimizer step, in the global order."""

    def __init__(self, samples: PackedSamples, train_range: tuple[int, int], seed: int, dp_rank: int, dp_size: int,
                 micro_batch_size: int):
        self.samples, self.seed = samples, seed
        self.lo, self.hi = train_range
        self.dp_rank, self.dp_size, self.micro = dp_rank, dp_size, micro_batch_size
        self.consumed = 0  # global samples consumed: the loader's whole state
        self._order_cache: tuple[int, np.ndarray] | None = None

    def _global_indices(self, start: int, count: int) -> np.ndarray:
        n = self.hi - self.lo
        out = np.empty(count, dtype=np.int64)
        for j in range(count):
            epoch, k = divmod(start + j, n)
            if self._order_cache is None or self._order_cache[0] != epoch:
                self._order_cache = (epoch, sample_order(n, self.seed, epoch))
            out[j] = self.lo + self._order_cache[1][k]
        return out

    def next_step(self, global_batch: int) -> list[Batch]:
        """This rank's micro-batches of the next optimizer step of ``global_batch`` sequences."""
        per_rank = global_batch // self.dp_size
        idx = self._global_indices(self.consumed, global_batch)[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        self.consumed += global_batch
        return [self.samples.get(idx[i:i + self.micro]) for i in range(0, per_rank, self.micro)]

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"checkpoint data seed {state['seed']} != data.seed {self.seed}")
        self.consumed = int(state["consumed"])


def split_ranges(n_samples: int, val_fraction: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """Training samples first, the held-out validation samples are the tail."""
    n_val = int(n_samples * val_fraction)
    return (0, n_samples - n_val), (n_samples - n_val, n_samples)
