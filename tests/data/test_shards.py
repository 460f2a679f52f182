"""Tests for token shards, their checks and the multi-shard stream (lmexp.data.shards, lmexp.data.blocks)."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest

from lmexp.data.blocks import StreamBlocks
from lmexp.data.packing import TokenBlocks
from lmexp.data.shards import ShardStream, ShardWriter, verify_shard

EOS = 3


def random_documents(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 300) for _ in range(rng.randint(1, 30))] for _ in range(n)]


def write_shards(directory: Path, groups: list[list[list[int]]]):
    """Shards of the given documents (bytes = 3 per token, words = tokens); returns infos and the
    reference stream as packing writes it."""
    infos = []
    for index, documents in enumerate(groups):
        writer = ShardWriter(
            directory, f"u{index:05d}.train", np.dtype(np.uint16), EOS, leading_eos=index == 0
        )
        for start in range(0, len(documents), 7):  # several appends per shard
            batch = documents[start : start + 7]
            writer.add(batch, [3 * len(d) for d in batch], [len(d) for d in batch])
        infos.append(writer.finish())
    reference = [EOS] + [t for documents in groups for d in documents for t in (*d, EOS)]
    return infos, np.array(reference, dtype=np.int64)


@pytest.fixture
def shards(tmp_path: Path):
    groups = [random_documents(n, seed) for seed, n in enumerate([20, 0, 1, 35, 9])]
    infos, reference = write_shards(tmp_path, groups)
    return tmp_path, infos, reference, groups


def test_stream_is_the_packed_concatenation(shards) -> None:
    directory, infos, reference, groups = shards
    stream = ShardStream(directory, infos)
    assert len(stream) == len(reference) and stream.dtype == np.uint16
    assert np.array_equal(stream[:], reference)
    rng = random.Random(0)
    for _ in range(300):  # slices across every boundary
        a = rng.randrange(len(reference))
        b = rng.randrange(a, len(reference) + 5)
        assert np.array_equal(stream[a:b], reference[a:b])
    assert stream[-1] == EOS and stream[5] == reference[5]
    assert stream.n_documents == sum(len(g) for g in groups)
    assert [i.n_documents for i in infos] == [len(g) for g in groups]
    assert not list(directory.glob(".*.tmp"))  # temporaries renamed or removed


def test_documents_between_counts_each_document_at_its_eos(shards) -> None:
    directory, infos, reference, groups = shards
    stream = ShardStream(directory, infos)
    eos_positions = np.flatnonzero(reference == EOS)[1:]  # the leading eos closes no document
    lengths = np.array([len(d) for g in groups for d in g])
    rng = random.Random(1)
    for _ in range(300):
        a = rng.randrange(len(reference) + 1)
        b = rng.randrange(a, len(reference) + 2)
        inside = (eos_positions >= a) & (eos_positions < b)
        assert stream.documents_between(a, b) == (
            inside.sum(),
            3 * lengths[inside].sum(),
            lengths[inside].sum(),
        )
    assert stream.documents_between(0, len(stream)) == (len(lengths), stream.n_bytes, stream.n_words)


def test_block_datasets_over_the_stream(shards) -> None:
    directory, infos, reference, _ = shards
    stream = ShardStream(directory, infos)
    blocks = StreamBlocks(stream, block_size=16, pad_id=0, source_id=2)
    plain = TokenBlocks(reference, 16, 0)
    assert len(blocks) == len(plain)
    n_bytes = n_words = 0
    for i in range(len(blocks)):
        item, expected = blocks[i], plain[i]
        assert np.array_equal(item["input_ids"], expected["input_ids"])
        assert np.array_equal(item["labels"], expected["labels"])
        assert int(item["source"]) == 2
        n_bytes += int(item["n_bytes"])
        n_words += int(item["n_words"])
    assert (n_bytes, n_words) == (stream.n_bytes, stream.n_words)  # exact over the split
    assert blocks.text_between(0, len(blocks))[1:] == (stream.n_bytes, stream.n_words)
    assert blocks.text_between(2, 5)[1] == sum(int(blocks[i]["n_bytes"]) for i in range(2, 5))


def test_pickles_without_tokens(shards) -> None:
    directory, infos, reference, _ = shards
    blocks = StreamBlocks(ShardStream(directory, infos), 16, 0)
    blocks[3]  # opens maps
    payload = pickle.dumps(blocks)
    assert len(payload) < 4000
    clone = pickle.loads(payload)
    assert np.array_equal(clone[3]["input_ids"], blocks[3]["input_ids"])


def test_verify_detects_truncation_alteration_and_disagreement(shards) -> None:
    directory, infos, _, _ = shards
    info = infos[3]
    assert all(
        verify_shard(directory, i, EOS, level) is None for i in infos for level in ("size", "sample", "full")
    )
    tokens = directory / info.tokens_file
    data = tokens.read_bytes()
    tokens.write_bytes(data[:-2])
    assert f"is {len(data) - 2} bytes, expected {len(data)} (truncated" in verify_shard(
        directory, info, EOS, "size"
    )
    altered = bytearray(data)
    altered[len(altered) // 2] ^= 0xFF
    tokens.write_bytes(bytes(altered))
    assert "sampled checksum" in verify_shard(directory, info, EOS, "sample")
    assert verify_shard(directory, info, EOS, "size") is None  # sizes alone cannot see it
    tokens.write_bytes(data)
    info.n_bytes += 1
    assert "disagrees with its entry" in verify_shard(directory, info, EOS, "size")
    (directory / info.docs_file).unlink()
    assert "is missing" in verify_shard(directory, info, EOS)


def test_full_verify_reads_every_token(tmp_path: Path) -> None:
    infos, reference = write_shards(tmp_path, [random_documents(6000, 5)])
    info = infos[0]
    tokens = tmp_path / info.tokens_file
    data = bytearray(tokens.read_bytes())
    assert len(data) > 16 * 4096 * 2  # big enough that the sampled windows skip some bytes
    offset = 4096 + 100  # between the first and second sampled window
    data[offset] ^= 0x01
    tokens.write_bytes(bytes(data))
    assert verify_shard(tmp_path, info, EOS, "sample") is None
    assert "CRC-32" in verify_shard(tmp_path, info, EOS, "full")


def test_a_rebuild_overwrites_the_temporaries_of_a_killed_build(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "u00004.val", np.dtype(np.uint16), EOS, leading_eos=False)
    writer.add([[5, 6]], [2], [1])  # then "killed": never finished
    assert len(list(tmp_path.glob(".u00004.*.tmp"))) == 2
    again = ShardWriter(tmp_path, "u00004.val", np.dtype(np.uint16), EOS, leading_eos=False)
    again.add([[7]], [1], [1])
    info = again.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u00004.val.bin", "u00004.val.docs"]
    assert ShardStream(tmp_path, [info])[:].tolist() == [7, EOS]


def test_uint32_tokens_for_large_vocabularies(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "u00000.train", np.dtype(np.uint32), EOS, leading_eos=True)
    writer.add([[70_000, 5]], [4], [1])
    stream = ShardStream(tmp_path, [writer.finish()])
    assert stream.dtype == np.uint32 and stream[:].tolist() == [EOS, 70_000, 5, EOS]
