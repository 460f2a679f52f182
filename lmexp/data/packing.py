"""Packed token files and the fixed-length block dataset over them.

A split's documents become ONE flat token stream: ``[eos] + tokens(doc)`` for each document, then one final
``[eos]``. Every document token and every document-ending eos is therefore a prediction target, and the
leading eos is context only. The stream is stored raw (uint16 or uint32) and memory-mapped for reading,
with a JSON sidecar holding its metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from lmexp.cache import atomic_path, atomic_write_json
from lmexp.errors import ConfigError, DataError

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips


class _Encoder(Protocol):
    """What :func:`write_token_file` needs from a tokenizer."""

    vocab_size: int
    eos_id: int

    def encode(self, texts: list[str]) -> list[list[int]]: ...


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a ``vocab_size`` vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def meta_path(path: Path) -> Path:
    """The JSON sidecar of a token file."""
    return Path(path).with_suffix(".json")


def write_token_file(documents: list[str], tokenizer: _Encoder, path: Path, batch_size: int = 1024) -> dict:
    """Tokenize ``documents`` in batches into the packed stream at ``path``; returns the sidecar meta.

    The token file and then its sidecar are each written to a temporary name and renamed, so after an
    error nothing half-written remains, and a present sidecar means a finished token file.
    """
    path = Path(path)
    if not documents:
        raise DataError(f"{path}: no documents to tokenize; expected at least one")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    meta_path(path).unlink(missing_ok=True)  # a stale sidecar must not vouch for the new token file
    n_tokens = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        for start in range(0, len(documents), batch_size):
            pieces: list[np.ndarray] = []
            for ids in tokenizer.encode(documents[start : start + batch_size]):
                pieces.append(eos)
                pieces.append(np.asarray(ids, dtype=dtype))
            block = np.concatenate(pieces)
            out.write(block.tobytes())
            n_tokens += len(block)
        out.write(eos.tobytes())
        n_tokens += 1
    meta = {
        "n_tokens": n_tokens,
        "n_documents": len(documents),
        "n_words": sum(len(doc.split()) for doc in documents),
        "dtype": dtype.name,
        "vocab_size": int(tokenizer.vocab_size),
    }
    atomic_write_json(meta_path(path), meta)
    return meta


def load_token_file(path: Path) -> tuple[np.memmap, dict]:
    """Memory-map a token file written by :func:`write_token_file`, checking its size against the sidecar."""
    path = Path(path)
    sidecar = meta_path(path)
    if not path.is_file():
        raise DataError(f"{path}: token file does not exist; expected one written by write_token_file")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        n_tokens = int(meta["n_tokens"])
    except FileNotFoundError:
        raise DataError(f"{sidecar}: sidecar of token file {path} is missing; delete it to rebuild") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{sidecar}: unreadable token-file metadata ({type(err).__name__}: {err})") from None
    expected = n_tokens * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected or n_tokens < 1:
        raise DataError(
            f"{path}: is {actual} bytes, expected {expected} ({n_tokens} {dtype.name} tokens per "
            f"{sidecar.name}); the file is truncated or stale, delete it to rebuild"
        )
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,)), meta


class TokenBlocks(torch.utils.data.Dataset):
    """Fixed-length blocks over a token stream: block i has input_ids = stream[i*B : i*B+B] and labels =
    stream[i*B+1 : i*B+B+1]. Every token after the first appears exactly once as a label; the last block is
    padded (input pad_id, label -100)."""

    def __init__(
        self,
        stream: np.ndarray,
        block_size: int,
        pad_id: int,
        word_start_mask: np.ndarray | None = None,
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
        self.word_start_mask = None if word_start_mask is None else np.asarray(word_start_mask, dtype=bool)
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
        n_words = int(self.word_start_mask[labels].sum()) if self.word_start_mask is not None else 0
        n_pad = self.block_size - len(labels)
        if n_pad:  # only the last block is short
            inputs = np.concatenate([inputs, np.full(n_pad, self.pad_id, dtype=np.int64)])
            labels = np.concatenate([labels, np.full(n_pad, IGNORE_INDEX, dtype=np.int64)])
        return {
            "input_ids": torch.from_numpy(inputs),
            "labels": torch.from_numpy(labels),
            "n_words": torch.tensor(n_words, dtype=torch.int64),
        }

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


def split_documents(
    n_documents: int, fractions: dict[str, float], seed: int, key: str = "data.splits"
) -> dict[str, np.ndarray]:
    """Split ``range(n_documents)`` by a seeded permutation into disjoint, sorted index arrays.

    ``fractions`` (e.g. ``{"train": 0.9, "val": 0.05, "test": 0.05}``) must sum to 1; every split with a
    positive fraction gets at least one document, else :class:`DataError` names the split.
    """
    _check_fractions(fractions, key)
    counts = _split_counts(n_documents, fractions, key)
    order = np.random.default_rng(seed).permutation(n_documents)
    splits: dict[str, np.ndarray] = {}
    start = 0
    for name, count in zip(fractions, counts, strict=True):
        splits[name] = np.sort(order[start : start + count]).astype(np.int64)
        start += count
    return splits


def _check_fractions(fractions: dict[str, float], key: str) -> None:
    """Raise :class:`ConfigError` listing every bad fraction, or a sum other than 1."""
    if not fractions:
        raise ConfigError(f"{key}: no splits given; expected e.g. {{train: 0.9, val: 0.05, test: 0.05}}")
    problems = [
        f"{key}.{name}={value!r} must be a number in [0, 1]"
        for name, value in fractions.items()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1
    ]
    if not problems and abs(sum(fractions.values()) - 1) > 1e-6:
        problems.append(f"{key}: fractions sum to {sum(fractions.values()):g}; expected 1")
    if problems:
        raise ConfigError(problems)


def _split_counts(n_documents: int, fractions: dict[str, float], key: str) -> list[int]:
    """Documents per split by largest remainder, moved so every positive-fraction split is non-empty."""
    names = list(fractions)
    exact = np.array([fractions[name] * n_documents for name in names], dtype=np.float64)
    counts = np.floor(exact).astype(np.int64)
    for j in np.argsort(-(exact - counts), kind="stable")[: n_documents - int(counts.sum())]:
        counts[j] += 1
    for j, name in enumerate(names):
        if fractions[name] > 0 and counts[j] == 0:
            donor = int(np.argmax(counts))
            if counts[donor] <= 1:
                raise DataError(
                    f"{key}.{name}: split would be empty: {n_documents} documents are too few for "
                    f"{sum(1 for f in fractions.values() if f > 0)} non-empty splits; add documents"
                )
            counts[donor] -= 1
            counts[j] += 1
    return counts.tolist()
