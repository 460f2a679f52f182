"""Tests for packed token files, the block dataset and document splits (lmexp.data.packing)."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lmexp.data.packing import (
    TokenBlocks,
    load_token_file,
    meta_path,
    split_documents,
    write_token_file,
)
from lmexp.data.tokenizer import Tokenizer, TokenizerConfig, train_or_load_tokenizer
from lmexp.errors import ConfigError, DataError

WORDS = "the a small red cat dog bird runs sleeps over under river city today and but quietly".split()


def make_documents(n_documents: int, seed: int = 0) -> list[str]:
    """Random documents of 3 to 40 words, some with line breaks."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_documents):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 40))]
        cut = rng.randint(1, len(words))
        docs.append(" ".join(words[:cut]) + ".\n" + " ".join(words[cut:]))
    return docs


DOCUMENTS = make_documents(60)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    cache = tmp_path_factory.mktemp("cache")
    return train_or_load_tokenizer(DOCUMENTS, "packing", TokenizerConfig(vocab_size=300), cache)


@pytest.fixture(scope="module")
def packed(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> tuple[np.memmap, dict]:
    path = tmp_path_factory.mktemp("packed") / "train.bin"
    meta = write_token_file(DOCUMENTS, tok, path, batch_size=7)  # several batches, one partial
    stream, loaded_meta = load_token_file(path)
    assert loaded_meta == meta
    return stream, meta


def test_stream_layout(packed: tuple[np.memmap, dict], tok: Tokenizer) -> None:
    stream, meta = packed
    assert stream.dtype == np.uint16 and meta["dtype"] == "uint16"
    assert meta["n_tokens"] == len(stream)
    assert meta["n_documents"] == len(DOCUMENTS)
    assert meta["n_words"] == sum(len(d.split()) for d in DOCUMENTS)
    assert meta["vocab_size"] == tok.vocab_size
    eos_at = np.flatnonzero(np.asarray(stream) == tok.eos_id)
    assert eos_at[0] == 0 and eos_at[-1] == len(stream) - 1 and len(eos_at) == len(DOCUMENTS) + 1
    expected = [" ".join(d.split()) for d in DOCUMENTS]  # sentencepiece folds newlines into spaces
    decoded = [tok.decode(stream[a + 1 : b]) for a, b in zip(eos_at[:-1], eos_at[1:], strict=True)]
    assert decoded == expected


@pytest.mark.parametrize("block_size", [1, 5, 16, 64])
def test_every_token_is_a_label_once_in_order(packed: tuple[np.memmap, dict], block_size: int) -> None:
    stream, _ = packed
    blocks = TokenBlocks(stream, block_size, pad_id=0)
    assert len(blocks) == -(-(len(stream) - 1) // block_size)
    items = [blocks[i] for i in range(len(blocks))]
    labels = torch.cat([item["labels"] for item in items])
    assert torch.equal(labels[labels != -100], torch.from_numpy(stream[1:].astype(np.int64)))
    for i, item in enumerate(items):
        assert item["input_ids"].dtype == torch.int64 and item["labels"].dtype == torch.int64
        assert item["input_ids"].shape == item["labels"].shape == (block_size,)
        assert int(item["input_ids"][0]) == int(stream[i * block_size])  # blocks are aligned
        assert item["n_words"].dim() == 0 and int(item["n_words"]) == 0  # no mask given
    with pytest.raises(IndexError):
        blocks[len(blocks)]


def test_last_block_is_padded(packed: tuple[np.memmap, dict]) -> None:
    stream, _ = packed
    block_size = 16
    n_targets = len(stream) - 1
    blocks = TokenBlocks(stream, block_size, pad_id=0)
    last = blocks[len(blocks) - 1]
    n_real = n_targets - (len(blocks) - 1) * block_size
    assert 0 < n_real <= block_size
    assert (last["labels"][n_real:] == -100).all() and (last["labels"][:n_real] != -100).all()
    assert (last["input_ids"][n_real:] == 0).all()
    exact = TokenBlocks(stream[: block_size * 3 + 1], block_size, pad_id=0)
    assert len(exact) == 3 and (exact[2]["labels"] != -100).all()


def test_word_counts_sum_to_meta(packed: tuple[np.memmap, dict], tok: Tokenizer) -> None:
    stream, meta = packed
    blocks = TokenBlocks(stream, 32, pad_id=tok.pad_id, word_start_mask=tok.word_start_mask())
    assert sum(int(blocks[i]["n_words"]) for i in range(len(blocks))) == meta["n_words"]


def test_stream_shorter_than_a_block(packed: tuple[np.memmap, dict]) -> None:
    stream, _ = packed
    short = stream[:10]
    expected = r"val split has 10 tokens, fewer than one block of data.block_size=10 \(\+1\)"
    with pytest.raises(DataError, match=expected):
        TokenBlocks(short, 10, pad_id=0, split="val")
    assert len(TokenBlocks(short, 9, pad_id=0)) == 1
    with pytest.raises(ConfigError, match="data.block_size=0"):
        TokenBlocks(stream, 0, pad_id=0)


def test_dataset_pickles_memmap_by_reference(packed: tuple[np.memmap, dict]) -> None:
    stream, _ = packed
    blocks = TokenBlocks(stream, 8, pad_id=0)
    payload = pickle.dumps(blocks)
    assert len(payload) < 2000 < stream.nbytes  # the path travels, not the tokens
    clone = pickle.loads(payload)
    assert isinstance(clone.stream, np.memmap)
    assert torch.equal(clone[3]["labels"], blocks[3]["labels"])


def test_uint32_for_large_vocab(tmp_path: Path) -> None:
    stub = FakeTokenizer(vocab_size=70_000)
    meta = write_token_file(["a b", "c"], stub, tmp_path / "big.bin")
    stream, _ = load_token_file(tmp_path / "big.bin")
    assert meta["dtype"] == "uint32" and stream.dtype == np.uint32
    assert stream.tolist() == [3, 69_999, 69_999, 3, 69_999, 3]


class FakeTokenizer:
    """A stub tokenizer: lets the tests control encode() (large ids, failures) without training one."""

    def __init__(self, vocab_size: int = 300, fail_after_batches: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.eos_id = 3
        self.fail_after_batches = fail_after_batches
        self.calls = 0

    def encode(self, texts: list[str]) -> list[list[int]]:
        self.calls += 1
        if self.fail_after_batches is not None and self.calls > self.fail_after_batches:
            raise RuntimeError("encoder crashed")
        return [[self.vocab_size - 1] * len(t.split()) for t in texts]


def test_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    # A stub is the only reliable way to make encoding fail midway, after some batches were written.
    path = tmp_path / "out" / "train.bin"
    with pytest.raises(RuntimeError, match="encoder crashed"):
        write_token_file(make_documents(50), FakeTokenizer(fail_after_batches=2), path, batch_size=10)
    assert list(path.parent.iterdir()) == []


def test_rewrite_replaces_stale_meta(tmp_path: Path) -> None:
    path = tmp_path / "train.bin"
    write_token_file(["a b c"], FakeTokenizer(), path)
    with pytest.raises(RuntimeError):
        write_token_file(["a b c d e"], FakeTokenizer(fail_after_batches=0), path)
    assert not meta_path(path).exists()  # the old sidecar no longer vouches for anything


def test_load_errors(tmp_path: Path) -> None:
    path = tmp_path / "train.bin"
    with pytest.raises(DataError, match="token file does not exist"):
        load_token_file(path)
    write_token_file(["a b c", "d"], FakeTokenizer(), path)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 2)
    with pytest.raises(DataError, match=r"is 12 bytes, expected 14 .*truncated or stale") as info:
        load_token_file(path)
    assert "\n" not in str(info.value)
    meta_path(path).unlink()
    with pytest.raises(DataError, match="sidecar of token file .* is missing"):
        load_token_file(path)


def test_splits_disjoint_cover_and_deterministic() -> None:
    fractions = {"train": 0.9, "val": 0.05, "test": 0.05}
    splits = split_documents(1003, fractions, seed=7)
    assert list(splits) == ["train", "val", "test"]
    joined = np.concatenate(list(splits.values()))
    assert sorted(joined.tolist()) == list(range(1003))  # disjoint and covering
    assert [len(s) for s in splits.values()] == [903, 50, 50]
    assert all((np.diff(s) > 0).all() for s in splits.values())  # sorted
    again = split_documents(1003, fractions, seed=7)
    assert all(np.array_equal(splits[k], again[k]) for k in fractions)
    other = split_documents(1003, fractions, seed=8)
    assert not np.array_equal(splits["val"], other["val"])


def test_splits_tiny_corpus_still_non_empty() -> None:
    splits = split_documents(3, {"train": 0.9, "val": 0.05, "test": 0.05}, seed=0)
    assert [len(s) for s in splits.values()] == [1, 1, 1]
    with pytest.raises(DataError, match=r"data.splits.(val|test): split would be empty: 2 documents"):
        split_documents(2, {"train": 0.9, "val": 0.05, "test": 0.05}, seed=0)
    assert len(split_documents(5, {"train": 1.0, "test": 0.0}, seed=0)["test"]) == 0


def test_split_fraction_errors() -> None:
    with pytest.raises(ConfigError, match="fractions sum to 0.9; expected 1"):
        split_documents(100, {"train": 0.8, "val": 0.1}, seed=0)
    with pytest.raises(ConfigError, match=r"data.splits.val=-0.1 must be a number in \[0, 1\]"):
        split_documents(100, {"train": 1.1, "val": -0.1}, seed=0)
