"""A bounded, seeded sample of training lines for tokenizer training, taken in one streaming pass.

Sentencepiece holds every training line in memory, so a huge corpus cannot be handed to it whole.
:func:`sample_lines` reads the training documents of the planned sources once (never more than
``max_read_bytes`` of input: whole units, evenly spaced over each source, when the corpus is bigger) and
keeps a uniform sample of their non-empty lines by *bottom-k sampling*: every line gets a pseudo-random
priority from (seed, source, unit, line number), and the sample is the lines of lowest priority that fit
in ``max_lines`` lines and ``max_bytes`` bytes. Memory is bounded by the sample; the result does not depend
on the order units are read in. Sentencepiece's ``input_sentence_size`` and ``shuffle_input_sentence``
(set by :func:`~lmexp.data.tokenizer.train_or_load_tokenizer`) bound the rest.

Only documents of the train split are sampled (the same :class:`~lmexp.data.prepare.SplitRule` as
preparation), so validation text never shapes the vocabulary.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lmexp.cache import build_lock, stable_hash
from lmexp.data.prepare import PrepareConfig, SourcePlan, SplitRule
from lmexp.data.sources import is_hf_source, open_hf_dataset, read_unit
from lmexp.data.tokenizer import (
    MODEL_FILE,
    Tokenizer,
    TokenizerConfig,
    tokenizer_cache_dir,
    train_or_load_tokenizer,
)
from lmexp.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_PRIORITY_BATCH = 4096


@dataclass
class SampleConfig:
    """How many training lines the tokenizer sees; all fields are part of the tokenizer's cache key."""

    max_lines: int = 1_000_000
    """At most this many lines."""
    max_bytes: int = 100 << 20
    """At most this many UTF-8 bytes of lines in total (the sample's own memory is about 2x this, and
    sentencepiece's training a few times more)."""
    max_read_bytes: int = 2 << 30
    """Read at most this many input bytes (whole units, evenly spaced); 0: read everything."""
    seed: int = 0
    """Seed of the line priorities."""

    def validate(self) -> None:
        problems = [
            f"tokenizer.sample.{name}={getattr(self, name)!r}: expected an integer >= {minimum}"
            for name, minimum in (("max_lines", 1), ("max_bytes", 1), ("max_read_bytes", 0))
            if not isinstance(getattr(self, name), int) or getattr(self, name) < minimum
        ]
        if problems:
            raise ConfigError(problems)


class _BottomK:
    """The lines of lowest priority within a count and a byte budget (a max-heap on priority)."""

    def __init__(self, max_lines: int, max_bytes: int) -> None:
        self.max_lines, self.max_bytes = max_lines, max_bytes
        self.heap: list[tuple[float, int, str]] = []  # (-priority, tie-break, line)
        self.n_bytes = 0
        self._serial = 0

    def offer(self, priority: float, line: str) -> None:
        if len(self.heap) >= self.max_lines and priority >= -self.heap[0][0]:
            return
        size = len(line.encode("utf-8"))
        self._serial += 1
        heapq.heappush(self.heap, (-priority, self._serial, line))
        self.n_bytes += size
        while len(self.heap) > self.max_lines or (self.n_bytes > self.max_bytes and len(self.heap) > 1):
            _, _, dropped = heapq.heappop(self.heap)
            self.n_bytes -= len(dropped.encode("utf-8"))

    def lines(self) -> list[str]:
        """The sample, lowest priority first (a deterministic, shuffled order)."""
        return [line for _, _, line in sorted(self.heap, key=lambda item: (-item[0], item[1]))]


def units_to_read(plan: SourcePlan, budget: int) -> list[int]:
    """Indices of the units sampled: all of them, or evenly spaced ones within ``budget`` input bytes."""
    total = plan.input_bytes
    if not budget or total <= budget or len(plan.units) <= 1:
        return [unit.index for unit in plan.units]
    keep = max(1, int(len(plan.units) * budget / total))
    return sorted({int(i) for i in np.linspace(0, len(plan.units) - 1, keep).round()})


def sample_lines(
    plans: list[SourcePlan], prepare: PrepareConfig, config: SampleConfig | None = None
) -> list[str]:
    """A seeded sample of the non-empty lines of the training documents of ``plans`` (see module doc)."""
    config = config or SampleConfig()
    config.validate()
    sample = _BottomK(config.max_lines, config.max_bytes)
    budget = config.max_read_bytes // max(1, len(plans)) if config.max_read_bytes else 0
    for plan in plans:
        if plan.spec.assign_split not in (None, "train"):
            continue  # a held-out source
        rule = SplitRule(prepare.splits, prepare.split_seed, plan.spec.assign_split)
        dataset = open_hf_dataset(plan.spec) if is_hf_source(plan.spec) else None
        source_id = int(plan.key[:8], 16)
        for index in units_to_read(plan, budget):
            rng = np.random.default_rng([config.seed, source_id, index])
            priorities, used = rng.random(_PRIORITY_BATCH), 0
            for document in read_unit(plan.units[index], plan.spec, dataset):
                if rule(document.encode("utf-8")) != "train":
                    continue
                for line in document.split("\n"):
                    if not line.strip():
                        continue
                    if used == _PRIORITY_BATCH:
                        priorities, used = rng.random(_PRIORITY_BATCH), 0
                    sample.offer(float(priorities[used]), line)
                    used += 1
    lines = sample.lines()
    if not lines:
        raise DataError("tokenizer: the training split has no non-empty lines to train on")
    return lines


def tokenizer_corpus_key(plans: list[SourcePlan], prepare: PrepareConfig, config: SampleConfig) -> str:
    """The ``corpus_key`` for :func:`train_or_load_tokenizer`: the sources' plans, split rule and sample."""
    return stable_hash(
        {
            "sources": sorted(plan.key + ":" + str(plan.spec.assign_split) for plan in plans),
            "splits": prepare.splits,
            "split_seed": prepare.split_seed,
            "sample": asdict(config),
        }
    )


def train_or_load_sampled_tokenizer(
    plans: list[SourcePlan],
    tokenizer_config: TokenizerConfig,
    cache_dir: Path,
    prepare: PrepareConfig,
    config: SampleConfig | None = None,
) -> Tokenizer:
    """The cached tokenizer of these sources, or one trained on a fresh :func:`sample_lines` sample.

    The sample is drawn only when no tokenizer is cached, by one process at a time (a lock per key), so
    concurrent ranks do not all read the corpus.
    """
    config = config or SampleConfig()
    key = tokenizer_corpus_key(plans, prepare, config)
    model = tokenizer_cache_dir(key, tokenizer_config, Path(cache_dir)) / MODEL_FILE
    if not model.is_file():
        with build_lock(Path(cache_dir) / "tokenizer-samples" / key):
            if not model.is_file():
                lines = sample_lines(plans, prepare, config)
                log.info("sampled %d lines for the tokenizer", len(lines))
                return train_or_load_tokenizer(lines, key, tokenizer_config, Path(cache_dir))
    return train_or_load_tokenizer([], key, tokenizer_config, Path(cache_dir))
