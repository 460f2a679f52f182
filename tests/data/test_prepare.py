"""Tests for parallel preparation (lmexp.data.prepare) and the engine's entry point (lmexp.data.engine)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lmexp.data.engine import prepare_corpus
from lmexp.data.prepare import (
    INDEX_FILE,
    PrepareConfig,
    SplitRule,
    open_prepared,
    plan_source,
    prepare_source,
    read_builds_log,
    split_of,
    token_directory,
)
from lmexp.data.sources import SourceSpec
from lmexp.data.tokenizer import Tokenizer, TokenizerConfig
from lmexp.errors import ConfigError, DataError
from tests.data.engine_helpers import make_documents, train_tokenizer, write_jsonl, write_txt

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = make_documents(600)
SPLITS = {"train": 0.8, "val": 0.1, "test": 0.1}
CONFIG = PrepareConfig(splits=SPLITS, unit_bytes=4000, workers=1)  # about 17 units of DOCUMENTS


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_tokenizer(DOCUMENTS, tmp_path_factory.mktemp("tok"))


@pytest.fixture
def corpus(tmp_path: Path) -> SourceSpec:
    return SourceSpec("web", str(write_txt(tmp_path / "corpus.txt", DOCUMENTS)))


def split_documents(documents: list[str], splits=SPLITS, seed: int = 0) -> dict[str, list[str]]:
    by_split: dict[str, list[str]] = {name: [] for name in splits}
    for document in documents:
        by_split[split_of(document, splits, seed)].append(document)
    return by_split


def reference_stream(documents: list[str], tok: Tokenizer) -> np.ndarray:
    """The split packed from documents in memory: ``[eos] doc [eos] doc ... [eos]``."""
    ids = [tok.eos_id]
    for encoded in tok.encode(documents):
        ids += [*encoded, tok.eos_id]
    return np.asarray(ids)


def test_split_streams_are_packing_streams_with_exact_bytes_and_words(corpus, tok, tmp_path) -> None:
    prepared = prepare_source(corpus, tok.path, tmp_path / "cache", CONFIG)
    assert len(prepared.entries) > 10 and prepared.splits == ["train", "val", "test"]
    for split, documents in split_documents(DOCUMENTS).items():
        stream = prepared.stream(split)
        assert np.array_equal(stream[:], reference_stream(documents, tok))
        totals = prepared.totals(split)
        assert totals["n_documents"] == len(documents) == stream.n_documents
        assert totals["n_bytes"] == sum(len(d.encode("utf-8")) for d in documents)
        assert totals["n_words"] == sum(len(d.split()) for d in documents)
        assert totals["n_bytes"] > sum(len(d) for d in documents)  # non-ASCII: bytes, not characters
        blocks = prepared.blocks(split, block_size=32, pad_id=tok.pad_id)
        assert sum(int(blocks[i]["n_bytes"]) for i in range(len(blocks))) == totals["n_bytes"]
    assert (tmp_path / "cache").joinpath("sources").is_dir() and (prepared.directory / INDEX_FILE).is_file()


def test_split_of_a_document_does_not_depend_on_units_or_position(corpus, tok, tmp_path) -> None:
    one = prepare_source(corpus, tok.path, tmp_path / "a", PrepareConfig(splits=SPLITS, unit_bytes=1 << 20))
    many = prepare_source(corpus, tok.path, tmp_path / "b", CONFIG)
    assert len(one.entries) == 1 and len(many.entries) > 10
    for split in SPLITS:
        assert np.array_equal(one.stream(split)[:], many.stream(split)[:])
    rule = SplitRule(SPLITS, seed=0)
    assert {rule(d.encode()) for d in DOCUMENTS} == set(SPLITS)
    assert Counter(rule(d.encode()) for d in DOCUMENTS)["train"] in range(440, 521)  # ~80% of 600
    other_seed = SplitRule(SPLITS, seed=1)
    assert [rule(d.encode()) for d in DOCUMENTS] != [other_seed(d.encode()) for d in DOCUMENTS]


def test_a_second_prepare_builds_nothing_and_reads_the_index(corpus, tok, tmp_path) -> None:
    first = prepare_source(corpus, tok.path, tmp_path, CONFIG)
    builds = read_builds_log(first.directory)
    again = prepare_source(corpus, tok.path, tmp_path, CONFIG)
    assert read_builds_log(first.directory) == builds
    assert Counter(b["unit"] for b in builds) == Counter(range(len(first.entries)))  # each unit once
    assert again.entries == first.entries
    assert open_prepared(corpus, tok.path, tmp_path, CONFIG).entries == first.entries


def test_reading_before_preparing_is_an_error(corpus, tok, tmp_path) -> None:
    with pytest.raises(DataError, match=r"data\.sources\.web: \d+ of \d+ units are not prepared"):
        open_prepared(corpus, tok.path, tmp_path, CONFIG)


def test_an_assigned_split_and_a_jsonl_source(tok, tmp_path) -> None:
    spec = SourceSpec("heldout", str(write_jsonl(tmp_path / "v.jsonl", DOCUMENTS[:50])), assign_split="val")
    prepared = prepare_source(spec, tok.path, tmp_path / "cache", CONFIG)
    assert prepared.splits == ["val"]
    assert np.array_equal(prepared.stream("val")[:], reference_stream(DOCUMENTS[:50], tok))
    with pytest.raises(DataError, match="data.sources.heldout: has no train split"):
        prepared.stream("train")


def test_a_damaged_shard_is_detected_and_only_its_unit_rebuilt(corpus, tok, tmp_path) -> None:
    prepared = prepare_source(corpus, tok.path, tmp_path, CONFIG)
    expected = prepared.stream("train")[:]
    shard = prepared.directory / "u00003.train.bin"
    shard.write_bytes(shard.read_bytes()[:-2])  # truncated
    with pytest.raises(DataError, match=r"u00003\.train\.bin is \d+ bytes, expected \d+ \(truncated") as info:
        open_prepared(corpus, tok.path, tmp_path, CONFIG)
    assert "\n" not in str(info.value) and "rebuild" in str(info.value)
    rebuilt = prepare_source(corpus, tok.path, tmp_path, CONFIG)
    assert np.array_equal(rebuilt.stream("train")[:], expected)
    assert Counter(b["unit"] for b in read_builds_log(prepared.directory))[3] == 2


def test_files_left_by_a_build_killed_half_way_are_removed_when_it_is_rebuilt(corpus, tok, tmp_path) -> None:
    directory = prepare_source(corpus, tok.path, tmp_path, CONFIG).directory
    (directory / "u00003.json").unlink()  # as if killed while writing the entry: the unit is not built
    (directory / INDEX_FILE).unlink()
    leftovers = [directory / ".u00003.json.k1ll3d.tmp", directory / ".u00003.train.bin.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"half")
    prepare_source(corpus, tok.path, tmp_path, CONFIG)
    assert not [path for path in leftovers if path.exists()]
    assert Counter(b["unit"] for b in read_builds_log(directory))[3] == 2


def test_an_entry_that_disagrees_with_its_shard_is_detected(corpus, tok, tmp_path) -> None:
    prepared = prepare_source(corpus, tok.path, tmp_path, CONFIG)
    index_file = prepared.directory / INDEX_FILE
    index = json.loads(index_file.read_text())
    index["entries"][2]["shards"]["val"]["n_words"] += 1
    index_file.write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"shard u00002\.val disagrees with its entry"):
        open_prepared(corpus, tok.path, tmp_path, CONFIG)
    altered = prepared.directory / "u00004.test.docs"
    data = bytearray(altered.read_bytes())
    data[0] ^= 1
    altered.write_bytes(bytes(data))
    assert prepare_source(corpus, tok.path, tmp_path, CONFIG).totals("val") == prepared.totals("val")


def test_bad_input_in_a_later_unit_is_one_line_and_keeps_finished_units(tok, tmp_path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", DOCUMENTS[:100])
    with path.open("a") as handle:
        handle.write("{broken\n")
    spec = SourceSpec("j", str(path))
    with pytest.raises(DataError, match=r"data\.sources\.j\.path: .*c\.jsonl line 101: malformed JSON"):
        prepare_source(spec, tok.path, tmp_path / "cache", CONFIG)
    directory = token_directory(plan_source(spec, tmp_path / "cache", CONFIG), tok.path, CONFIG)
    assert len(read_builds_log(directory)) > 1 and not list(directory.glob(".*.tmp"))


def test_config_problems_are_named() -> None:
    with pytest.raises(ConfigError) as info:
        PrepareConfig(splits={"train": 0.5, "dev": 0.5}, workers=-1, verify="maybe").validate()
    message = str(info.value)
    assert "data.splits has unknown split(s) ['dev']" in message
    assert "data.workers=-1" in message and "data.verify='maybe'" in message
    with pytest.raises(ConfigError, match="fractions sum to 0.9"):
        PrepareConfig(splits={"train": 0.8, "val": 0.1}).validate()


def test_prepare_corpus_trains_a_sampled_tokenizer_and_mixes_sources(tmp_path) -> None:
    web = SourceSpec("web", str(write_txt(tmp_path / "web.txt", DOCUMENTS[:400])), weight=3.0)
    books = SourceSpec("books", str(write_jsonl(tmp_path / "b.jsonl", DOCUMENTS[400:])), weight=1.0)
    config = PrepareConfig(splits=SPLITS, unit_bytes=5000, workers=1)
    corpus = prepare_corpus([web, books], TokenizerConfig(vocab_size=400), tmp_path / "cache", config)
    assert corpus.names == ["web", "books"] and corpus.tokenizer.vocab_size == 400
    dataset, sampler = corpus.training(block_size=32, seed=0)
    counts = sampler.source_counts(8000)
    assert abs(counts[0] / counts.sum() - 0.75) < 0.03
    evaluation = corpus.evaluation("val", block_size=32)
    assert {int(evaluation[i]["source"]) for i in range(len(evaluation))} == {0, 1}
    assert sum(t["n_bytes"] for t in corpus.totals("val").values()) == sum(
        len(d.encode()) for d in split_documents(DOCUMENTS)["val"]
    )
    held_out = SourceSpec("held", str(write_jsonl(tmp_path / "h.jsonl", DOCUMENTS[:30])), assign_split="val")
    with_held_out = prepare_corpus(
        [held_out, web], TokenizerConfig(vocab_size=400), tmp_path / "cache", config
    )
    train_items, _ = with_held_out.training(block_size=32, seed=0)
    assert int(train_items[0]["source"]) == 1  # web's position among all sources, in every split
    val_items = with_held_out.evaluation("val", block_size=32)
    assert {int(val_items[i]["source"]) for i in range(len(val_items))} == {0, 1}
    reopened = prepare_corpus(
        [web, books], TokenizerConfig(vocab_size=400), tmp_path / "cache", config, build=False
    )
    assert reopened.tokenizer.path == corpus.tokenizer.path
    with pytest.raises(ConfigError, match="duplicate source names"):
        prepare_corpus([web, web], TokenizerConfig(vocab_size=400), tmp_path / "cache", config)


# ------------------------------------------------------------------ processes (slow: subprocesses)
PREPARE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from lmexp.data.prepare import PrepareConfig, prepare_source
    from lmexp.data.sources import SourceSpec
    path, tokenizer, cache, rank, world, workers, unit_bytes = sys.argv[1:8]
    config = PrepareConfig(splits={"train": 0.8, "val": 0.1, "test": 0.1}, unit_bytes=int(unit_bytes),
                           workers=int(workers))
    prepare_source(SourceSpec("web", path), tokenizer, cache, config, int(rank), int(world))
    # VmHWM: this process's peak RSS (ru_maxrss would include the parent's, inherited across exec)
    status = open("/proc/self/status").read()
    print(json.dumps({"peak_kib": int(status.split("VmHWM:")[1].split()[0])}))
    """
)


def start_prepare(path: Path, tok: Tokenizer, cache: Path, rank=0, world=1, workers=1, unit_bytes=4000):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", PREPARE_SCRIPT, str(path), str(tok.path), str(cache)]
    command += [str(rank), str(world), str(workers), str(unit_bytes)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_processes_share_the_units_and_build_each_once(tok, tmp_path) -> None:
    path = write_txt(tmp_path / "corpus.txt", DOCUMENTS * 4)
    processes = [start_prepare(path, tok, tmp_path / "cache", rank, 2) for rank in (0, 1)]
    for process in processes:
        finish(process)
    spec = SourceSpec("web", str(path))
    prepared = open_prepared(spec, tok.path, tmp_path / "cache", CONFIG)
    builds = read_builds_log(prepared.directory)
    assert Counter(b["unit"] for b in builds) == Counter(range(len(prepared.entries)))  # each exactly once
    builders = {b["by"] for b in builds}
    assert len(builders) == 2  # both processes built units (disjoint sets, since each unit appears once)
    by_builder = {who: {b["unit"] for b in builds if b["by"] == who} for who in builders}
    assert set.union(*by_builder.values()) == set(range(len(prepared.entries)))


@pytest.mark.slow
def test_worker_processes_of_one_call_and_their_errors(tok, tmp_path) -> None:
    spec = SourceSpec("web", str(write_txt(tmp_path / "corpus.txt", DOCUMENTS * 2)))
    config = PrepareConfig(splits=SPLITS, unit_bytes=4000, workers=2)
    prepared = prepare_source(spec, tok.path, tmp_path / "cache", config)
    builders = {b["by"] for b in read_builds_log(prepared.directory)}
    assert len(builders) == 2 and not any(b.endswith(f":{os.getpid()}") for b in builders)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(write_txt(tmp_path / "x.txt", DOCUMENTS).read_bytes() + b"\n\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"bad\.txt line \d+: is not valid UTF-8") as info:
        prepare_source(SourceSpec("web", str(bad)), tok.path, tmp_path / "cache", config)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_kill_9_mid_preparation_then_a_rerun_finishes_the_rest(tok, tmp_path) -> None:
    path = write_txt(tmp_path / "corpus.txt", DOCUMENTS * 6)
    spec, cache = SourceSpec("web", str(path)), tmp_path / "cache"
    directory = token_directory(plan_source(spec, cache, CONFIG), tok.path, CONFIG)
    process = start_prepare(path, tok, cache)
    deadline = time.monotonic() + 120
    while len(list(directory.glob("u*.json"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    n_units = len(plan_source(spec, cache, CONFIG).units)
    done_before = {p.name: json.loads(p.read_text())["built_by"] for p in directory.glob("u*.json")}
    assert 3 <= len(done_before) < n_units, "the kill came too late to test anything"
    prepared = prepare_source(spec, tok.path, cache, CONFIG)
    for name, builder in done_before.items():  # finished units are kept, not rebuilt
        assert json.loads((directory / name).read_text())["built_by"] == builder
    rebuilt = [b["unit"] for b in read_builds_log(directory) if b["by"].endswith(f":{os.getpid()}")]
    assert sorted(rebuilt) == sorted(set(range(n_units)) - {int(name[1:6]) for name in done_before})
    assert not list(directory.glob(".*.tmp"))
    expected = split_documents(DOCUMENTS * 6)["train"]
    assert np.array_equal(prepared.stream("train")[:], reference_stream(expected, tok))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc (Linux)")
def test_peak_memory_does_not_grow_with_the_corpus(tok, tmp_path) -> None:
    peaks = {}
    for copies in (16, 128):  # about 1 MB and 8 MB of text, one process, one unit
        path = write_txt(tmp_path / f"c{copies}.txt", DOCUMENTS * copies)
        peaks[copies] = finish(start_prepare(path, tok, tmp_path / "cache", unit_bytes=1 << 30))["peak_kib"]
    assert peaks[128] - peaks[16] < 4 * 1024, peaks  # 7 MB more text: under 4 MiB more (1.2 MiB measured)
