"""Packed token streams and the fixed-length block dataset over them.

A split's documents form ONE flat token stream: ``[eos] + tokens(doc)`` for each document, then one final
``[eos]`` (the data engine writes it as shards, lmexp/data/shards.py). Every document token and every
document-ending eos is therefore a prediction target, and the leading eos is context only. Tokens are
stored raw, uint16 or uint32 (:func:`token_dtype`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lmexp.errors import ConfigError, DataError

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a ``vocab_size`` vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class TokenBlocks(torch.utils.data.Dataset):
    """Fixed-length blocks over a token stream: block i has input_ids = stream[i*B : i*B+B] and labels =
    stream[i*B+1 : i*B+B+1]. Every token after the first appears exactly once as a label; the last block is
    padded (input pad_id, label -100)."""

    def __init__(
        self,
        stream: np.ndarray,
        block_size: int,
        pad_id: int,
        split: str = "data",
    ) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(f"data.block_size={block_size!r} must be an integer >= 1")
        n_tokens = len(stream)
        if n_tokens - 1 < block_size:
            raise DataError(
                f"{split} split has {n_tokens} tokens, fewer than one block of data.block_size={block_size} "
                "(+1); use more text or a smaller data.block_size"
            )
        self.stream = stream
        self.block_size = block_size
        self.pad_id = pad_id
        self._n_tokens = n_tokens

    def __len__(self) -> int:
        return -(-(self._n_tokens - 1) // self.block_size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n_blocks = len(self)
        if i < 0:
            i += n_blocks
        if not 0 <= i < n_blocks:
            raise IndexError(f"block {i} out of range for {n_blocks} blocks")
        start = i * self.block_size
        chunk = np.asarray(self.stream[start : start + self.block_size + 1]).astype(np.int64)
        inputs, labels = chunk[:-1], chunk[1:]
        n_pad = self.block_size - len(labels)
        if n_pad:  # only the last block is short
            inputs = np.concatenate([inputs, np.full(n_pad, self.pad_id, dtype=np.int64)])
            labels = np.concatenate([labels, np.full(n_pad, IGNORE_INDEX, dtype=np.int64)])
        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}

    def __getstate__(self) -> dict[str, Any]:
        # Pickling a memmap (DataLoader workers under spawn) would copy the whole stream; send its location.
        state = self.__dict__.copy()
        if isinstance(self.stream, np.memmap) and self.stream.filename is not None:
            mm = self.stream
            state["stream"] = ("memmap", mm.filename, mm.dtype.str, mm.offset, mm.shape)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        stream = state["stream"]
        if isinstance(stream, tuple) and stream and stream[0] == "memmap":
            _, filename, dtype, offset, shape = stream
            state["stream"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape)
        self.__dict__.update(state)
