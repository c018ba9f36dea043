"""The built-in byte-level tokenizer: UTF-8 bytes are tokens 0..255, EOS is 256."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    name = "moetrain-bytes"
    fingerprint = "moetrain-bytes-v1"  # fixed: nothing on disk to hash; bump if the mapping ever changes
    eos_id = 256
    vocab_size = 257

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if i < 256).decode("utf-8", errors="replace")
