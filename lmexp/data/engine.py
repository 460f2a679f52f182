"""The data engine's one entry point: sources -> tokenizer -> token shards -> block datasets.

:func:`prepare_corpus` is what a data module calls (from ``prepare_data``, with ``build=True``, on one
process per node; from ``setup``, with ``build=False``, on every rank):

1. plan every source into units (:func:`lmexp.data.prepare.plan_source`, cached);
2. train the tokenizer on a bounded sample of the training documents, or load it
   (:mod:`lmexp.data.tokenizer_sample`), unless a ``.model`` file is given;
3. build every source's shards in parallel (:func:`lmexp.data.prepare.prepare_source`);

and returns a :class:`PreparedCorpus`, whose :meth:`~PreparedCorpus.blocks` gives a block dataset per
source and split, :meth:`~PreparedCorpus.training` the weighted mixture and its sampler.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmexp.data.prepare import PrepareConfig, PreparedSource, open_prepared, plan_source, prepare_source
from lmexp.data.sources import SourceSpec
from lmexp.data.tokenizer import MODEL_FILE, Tokenizer, TokenizerConfig, load_tokenizer, tokenizer_cache_dir
from lmexp.data.tokenizer_sample import SampleConfig, tokenizer_corpus_key, train_or_load_sampled_tokenizer
from lmexp.errors import ConfigError, DataError


@dataclass
class PreparedCorpus:
    """Every source of a corpus, prepared with one tokenizer."""

    tokenizer: Any
    """lmexp's sentencepiece :class:`Tokenizer`, or a Hugging Face tokenizer (``HFTokenizer``)."""
    sources: dict[str, PreparedSource]
    """By source name, in the order given."""

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    def blocks(self, split: str, block_size: int) -> dict[str, Any]:
        """``{name: StreamBlocks}`` for every source that has ``split``; ``source`` ids are positions in
        :attr:`names`, so they are the same in every split."""
        return {
            name: source.blocks(split, block_size, self.tokenizer.pad_id, self.names.index(name))
            for name, source in self.sources.items()
            if split in source.splits
        }

    def evaluation(self, split: str, block_size: int) -> Any:
        """All sources' blocks of ``split`` as one :class:`~lmexp.data.mixture.MixtureDataset`, in order;
        each item's ``source`` is its source's position in :attr:`names` (for ``val/<source>/loss``)."""
        from lmexp.data.mixture import MixtureDataset

        blocks = self.blocks(split, block_size)
        if not blocks:
            raise DataError(f"no source has a {split} split")
        ids = [self.names.index(name) for name in blocks]
        return MixtureDataset(list(blocks.values()), list(blocks), ids)

    def training(self, block_size: int, seed: int, rank: int = 0, world_size: int = 1) -> tuple[Any, Any]:
        """The train split's :class:`MixtureDataset` and its weighted :class:`MixtureSampler`."""
        from lmexp.data.mixture import MixtureSampler

        dataset = self.evaluation("train", block_size)
        weights = [self.sources[name].spec.weight for name in dataset.names]
        sampler = MixtureSampler(dataset.sizes, weights, seed, rank, world_size, names=dataset.names)
        return dataset, sampler

    def totals(self, split: str) -> dict[str, dict[str, int]]:
        """Tokens, documents, words and bytes of ``split`` per source."""
        return {name: s.totals(split) for name, s in self.sources.items() if split in s.splits}


def prepare_corpus(
    sources: list[SourceSpec],
    tokenizer: TokenizerConfig | Path | str,
    cache_dir: Path | str,
    config: PrepareConfig | None = None,
    sample: SampleConfig | None = None,
    rank: int = 0,
    world_size: int = 1,
    build: bool = True,
) -> PreparedCorpus:
    """Prepare (``build=True``) or open (``build=False``: read-only, DataError if anything is missing)
    the token shards of ``sources``.

    ``tokenizer``: a :class:`TokenizerConfig` (trained on a sample of the training documents, cached) or
    the path of a ready tokenizer: a sentencepiece ``.model`` trained by lmexp, or a Hugging Face tokenizer
    directory (:func:`~lmexp.data.tokenizer.load_tokenizer`). ``rank``/``world_size``: this process's share
    of the work among the processes preparing the same corpus (one per node, or the tasks of an array).
    """
    config = config or PrepareConfig()
    cache_dir = Path(cache_dir).expanduser()
    _check_sources(sources)
    plans = [plan_source(spec, cache_dir, config) for spec in sources]
    if isinstance(tokenizer, TokenizerConfig):
        if build:
            loaded = train_or_load_sampled_tokenizer(plans, tokenizer, cache_dir, config, sample)
        else:
            key = tokenizer_corpus_key(plans, config, sample or SampleConfig())
            model = tokenizer_cache_dir(key, tokenizer, cache_dir) / MODEL_FILE
            loaded = Tokenizer.load(model, tokenizer.num_threads)
    else:
        loaded = load_tokenizer(tokenizer)
    prepared = {}
    for spec in sources:
        if build:
            prepared[spec.name] = prepare_source(spec, loaded.path, cache_dir, config, rank, world_size)
        else:
            prepared[spec.name] = open_prepared(spec, loaded.path, cache_dir, config)
    return PreparedCorpus(loaded, prepared)


def _check_sources(sources: list[SourceSpec]) -> None:
    if not sources:
        raise ConfigError("data.sources is empty: expected at least one source")
    problems = [problem for spec in sources for problem in spec.problems()]
    names = [spec.name for spec in sources]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        problems.append(f"data.sources: duplicate source names {duplicates}")
    if not any(spec.assign_split in (None, "train") for spec in sources):
        problems.append("data.sources: no source has training documents (every one has assign_split)")
    if problems:
        raise ConfigError(problems)


def process_share(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) of this process among the processes that prepare the same corpus together.

    Read from the environment, first match wins: a SLURM job array (``SLURM_ARRAY_TASK_ID`` from
    ``SLURM_ARRAY_TASK_MIN`` in steps of ``SLURM_ARRAY_TASK_STEP``, ``SLURM_ARRAY_TASK_COUNT`` tasks), the
    global ``RANK``/``WORLD_SIZE`` of torchrun or Lightning's launchers, ``SLURM_PROCID``/``SLURM_NTASKS``
    of ``srun``; else (0, 1). Any split of the work is correct (every process builds what is left, each
    unit once, under its lock); a right one lets the processes start on different units.
    """
    env = os.environ if environ is None else environ

    def number(name: str, default: int | None = None) -> int | None:
        value = env.get(name, "")
        return int(value) if value.strip().lstrip("-").isdigit() else default

    task, count = number("SLURM_ARRAY_TASK_ID"), number("SLURM_ARRAY_TASK_COUNT")
    if task is not None and count:
        step = number("SLURM_ARRAY_TASK_STEP", 1) or 1
        return ((task - (number("SLURM_ARRAY_TASK_MIN", 0) or 0)) // step) % count, count
    for rank_name, world_name in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        rank, world = number(rank_name), number(world_name)
        if rank is not None and world and 0 <= rank < world:
            return rank, world
    return 0, 1
