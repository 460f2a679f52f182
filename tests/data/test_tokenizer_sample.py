"""Tests for the bounded tokenizer-training sample (lmexp.data.tokenizer_sample)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmexp.data import tokenizer_sample
from lmexp.data.prepare import PrepareConfig, SplitRule, plan_source
from lmexp.data.sources import SourceSpec
from lmexp.data.tokenizer import TokenizerConfig
from lmexp.data.tokenizer_sample import (
    SampleConfig,
    sample_lines,
    train_or_load_sampled_tokenizer,
    units_to_read,
)
from lmexp.errors import ConfigError
from tests.data.engine_helpers import make_documents, write_jsonl, write_txt

DOCUMENTS = make_documents(800)
PREPARE = PrepareConfig(splits={"train": 0.8, "val": 0.2}, unit_bytes=5000)


@pytest.fixture
def plans(tmp_path: Path):
    web = SourceSpec("web", str(write_txt(tmp_path / "web.txt", DOCUMENTS)))
    held_out = SourceSpec(
        "v", str(write_jsonl(tmp_path / "v.jsonl", ["HELD OUT text"] * 5)), assign_split="val"
    )
    return [plan_source(spec, tmp_path / "cache", PREPARE) for spec in (web, held_out)]


def train_lines(documents: list[str]) -> list[str]:
    rule = SplitRule(PREPARE.splits, PREPARE.split_seed)
    return [line for d in documents if rule(d.encode()) == "train" for line in d.split("\n") if line.strip()]


def test_a_small_budget_is_a_bounded_seeded_sample_of_training_lines(plans) -> None:
    everything = sample_lines(plans, PREPARE, SampleConfig(max_lines=10**6))
    assert sorted(everything) == sorted(train_lines(DOCUMENTS))  # no val line, no held-out source
    sample = sample_lines(plans, PREPARE, SampleConfig(max_lines=100, seed=0))
    assert len(sample) == 100 and set(sample) <= set(everything)
    assert sample == sample_lines(plans, PREPARE, SampleConfig(max_lines=100, seed=0))
    assert sample != sample_lines(plans, PREPARE, SampleConfig(max_lines=100, seed=1))
    by_bytes = sample_lines(plans, PREPARE, SampleConfig(max_bytes=3000))
    assert sum(len(line.encode()) for line in by_bytes) <= 3000 and len(by_bytes) > 10


def test_the_sample_is_spread_over_the_corpus(plans) -> None:
    sample = sample_lines(plans, PREPARE, SampleConfig(max_lines=200))
    position = {line: i for i, line in enumerate(train_lines(DOCUMENTS))}
    quarters = [sum(1 for line in sample if position[line] * 4 // len(position) == q) for q in range(4)]
    assert min(quarters) > 25  # about 50 each, not the first 200 lines


def test_a_read_budget_reads_evenly_spaced_units(plans) -> None:
    plan = plans[0]
    assert len(plan.units) > 10
    assert units_to_read(plan, 0) == list(range(len(plan.units)))
    chosen = units_to_read(plan, plan.input_bytes // 4)
    assert len(chosen) in range(len(plan.units) // 4 - 1, len(plan.units) // 4 + 2)
    assert chosen[0] == 0 and chosen[-1] == len(plan.units) - 1


def test_the_tokenizer_is_trained_once_then_loaded_without_sampling(plans, tmp_path, monkeypatch) -> None:
    config = TokenizerConfig(vocab_size=400)
    first = train_or_load_sampled_tokenizer(
        plans, config, tmp_path / "cache", PREPARE, SampleConfig(max_lines=500)
    )

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again although the tokenizer is cached")

    monkeypatch.setattr(tokenizer_sample, "sample_lines", no_sampling)
    again = train_or_load_sampled_tokenizer(
        plans, config, tmp_path / "cache", PREPARE, SampleConfig(max_lines=500)
    )
    assert again.path == first.path and again.vocab_size == 400


def test_bad_sample_settings() -> None:
    with pytest.raises(ConfigError, match=r"tokenizer\.sample\.max_lines=0"):
        SampleConfig(max_lines=0).validate()
