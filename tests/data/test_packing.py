"""Tests for the block dataset over a packed token stream (lmexp.data.packing)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lmexp.data.packing import TokenBlocks, token_dtype
from lmexp.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def stream() -> np.ndarray:
    """A packed stream: eos (3) opens 40 documents of 1 to 30 tokens and closes the last."""
    rng = np.random.default_rng(0)
    ids = [3]
    for _ in range(40):
        ids += [*rng.integers(4, 300, rng.integers(1, 31)).tolist(), 3]
    return np.asarray(ids, dtype=np.uint16)


@pytest.mark.parametrize("block_size", [1, 5, 16, 64])
def test_every_token_is_a_label_once_in_order(stream: np.ndarray, block_size: int) -> None:
    blocks = TokenBlocks(stream, block_size, pad_id=0)
    assert len(blocks) == -(-(len(stream) - 1) // block_size)
    items = [blocks[i] for i in range(len(blocks))]
    labels = torch.cat([item["labels"] for item in items])
    assert torch.equal(labels[labels != -100], torch.from_numpy(stream[1:].astype(np.int64)))
    for i, item in enumerate(items):
        assert item["input_ids"].dtype == torch.int64 and item["labels"].dtype == torch.int64
        assert item["input_ids"].shape == item["labels"].shape == (block_size,)
        assert int(item["input_ids"][0]) == int(stream[i * block_size])  # blocks are aligned
    with pytest.raises(IndexError):
        blocks[len(blocks)]


def test_last_block_is_padded(stream: np.ndarray) -> None:
    block_size = 16
    blocks = TokenBlocks(stream, block_size, pad_id=0)
    last = blocks[len(blocks) - 1]
    n_real = len(stream) - 1 - (len(blocks) - 1) * block_size
    assert 0 < n_real <= block_size
    assert (last["labels"][n_real:] == -100).all() and (last["labels"][:n_real] != -100).all()
    assert (last["input_ids"][n_real:] == 0).all()
    exact = TokenBlocks(stream[: block_size * 3 + 1], block_size, pad_id=0)
    assert len(exact) == 3 and (exact[2]["labels"] != -100).all()


def test_stream_shorter_than_a_block(stream: np.ndarray) -> None:
    expected = r"val split has 10 tokens, fewer than one block of data.block_size=10 \(\+1\)"
    with pytest.raises(DataError, match=expected):
        TokenBlocks(stream[:10], 10, pad_id=0, split="val")
    assert len(TokenBlocks(stream[:10], 9, pad_id=0)) == 1
    with pytest.raises(ConfigError, match="data.block_size=0"):
        TokenBlocks(stream, 0, pad_id=0)


def test_dataset_pickles_memmap_by_reference(stream: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "tokens.bin"
    big = np.tile(stream, 50)  # 10k+ tokens, so that copying them would show
    big.tofile(path)
    mapped = np.memmap(path, dtype=big.dtype, mode="r", shape=big.shape)
    blocks = TokenBlocks(mapped, 8, pad_id=0)
    payload = pickle.dumps(blocks)
    assert len(payload) < 2000 < big.nbytes  # the path travels, not the tokens
    clone = pickle.loads(payload)
    assert isinstance(clone.stream, np.memmap)
    assert torch.equal(clone[3]["labels"], blocks[3]["labels"])


def test_token_dtype_fits_the_vocabulary() -> None:
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
