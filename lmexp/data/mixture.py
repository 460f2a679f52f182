"""Mixtures of prepared sources: one dataset over several block datasets, and a weighted training order.

:class:`MixtureDataset` puts the sources' block datasets one after another (index = the source's offset +
the block's index in it) and stamps each item with ``source``, the source's position, so evaluation can
report ``val/<source>/loss``. :class:`MixtureSampler` is the training order: an endless sequence of
*draws*; draw ``d`` picks a source with probability proportional to its weight, then the next block of that
source's own shuffled passes. It is a pure function of (seed, d), so

- every rank computes the same sequence and rank r of w takes draws r, r+w, r+2w, ... (disjoint);
- the state is one counter, the number of draws consumed; resuming recomputes the position from it;
- a small source is repeated (a fresh permutation per pass), a large one is not exhausted early.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from lmexp.errors import ConfigError

_CHUNK_DRAWS = 8192  # draws generated at once; one generator per chunk, seeded by (seed, chunk)


class MixtureDataset(Dataset):
    """Several map-style datasets as one; items gain ``source``: ``source_ids[k]`` for the k-th dataset
    (default k). Give every split's mixture the same ids (e.g. positions in the corpus's list of sources)
    when some source lacks a split, so that an id means the same source everywhere."""

    def __init__(
        self, datasets: Sequence[Dataset], names: Sequence[str], source_ids: Sequence[int] | None = None
    ) -> None:
        if len(datasets) != len(names) or not datasets:
            raise ConfigError("a mixture needs one name per dataset and at least one dataset")
        self.datasets, self.names = list(datasets), list(names)
        self.source_ids = list(range(len(datasets)) if source_ids is None else source_ids)
        self.sizes = [len(dataset) for dataset in self.datasets]
        self.offsets = np.cumsum([0, *self.sizes]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(source position, index within that source) of a mixture index."""
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} items")
        source = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return source, index - int(self.offsets[source])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        source, local = self.locate(int(index))
        item = dict(self.datasets[source][local])
        item["source"] = torch.tensor(self.source_ids[source], dtype=torch.int64)
        return item


class MixtureSampler(Sampler[int]):
    """Weighted, seeded, rank-sharded, resumable training order over a :class:`MixtureDataset`.

    Args:
        sizes: blocks per source (``MixtureDataset.sizes``).
        weights: relative share of draws per source; each must be > 0 (normalised here).
        seed: the seed of the whole order.
        rank, world_size: this process's share: draws ``rank``, ``rank + world_size``, ...
        epoch_draws: draws (all ranks together) in one "epoch" of the loader; default the mixture's size.
        names: source names for messages (``data.sources.<name>.weight``).

    The sampler has the interface of :class:`~lmexp.data.sampling.EpochShuffleSampler` (``set_epoch``,
    ``resume(epoch, items_done)``), so :class:`~lmexp.data.sampling.ResumableLoader` saves and restores
    it; ``state_dict``/``load_state_dict`` give the position as one counter, ``{"draws": n}``.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float],
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch_draws: int | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        names = list(names or [str(i) for i in range(len(sizes))])
        problems = [
            f"data.sources.{name}.weight={w!r}: expected a number > 0"
            for name, w in zip(names, weights, strict=True)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or not np.isfinite(w)
        ]
        problems += [
            f"data.sources.{n}: has no blocks" for n, size in zip(names, sizes, strict=True) if size < 1
        ]
        if problems:
            raise ConfigError(problems)
        if len(sizes) != len(weights) or not sizes:
            raise ConfigError("a mixture needs one weight per source and at least one source")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} is not in [0, world_size={world_size})")
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.offsets = np.cumsum([0, *sizes]).astype(np.int64)
        probabilities = np.asarray(weights, dtype=np.float64)
        self.probabilities = probabilities / probabilities.sum()
        self._bounds = np.cumsum(self.probabilities)[:-1]
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.per_rank = max(1, (epoch_draws or int(self.sizes.sum())) // world_size)
        self.epoch = 0
        self._skip: tuple[int, int] | None = None
        self._counts_before = [np.zeros(len(sizes), dtype=np.int64)]  # per chunk: draws of each source so far
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    # --------------------------------------------------------------------------- the sequence
    def _chunk_sources(self, chunk: int) -> np.ndarray:
        uniform = np.random.default_rng([self.seed, chunk]).random(_CHUNK_DRAWS)
        return np.searchsorted(self._bounds, uniform, side="right")

    def _counts(self, chunk: int) -> np.ndarray:
        """Draws of each source before chunk ``chunk`` (computed once, incrementally)."""
        while len(self._counts_before) <= chunk:
            k = len(self._counts_before) - 1
            counts = np.bincount(self._chunk_sources(k), minlength=len(self.sizes))
            self._counts_before.append(self._counts_before[k] + counts)
        return self._counts_before[chunk]

    def _permutation(self, source: int, source_epoch: int) -> np.ndarray:
        key = (source, source_epoch)
        if key not in self._permutations:
            if len(self._permutations) >= 4 * len(self.sizes):
                self._permutations.clear()
            rng = np.random.default_rng([self.seed, 7919, source, source_epoch])
            self._permutations[key] = rng.permutation(int(self.sizes[source]))
        return self._permutations[key]

    def draws(self, start: int, stop: int) -> np.ndarray:
        """Mixture indices of global draws ``start`` .. ``stop - 1`` (all ranks' draws)."""
        out = []
        for chunk in range(start // _CHUNK_DRAWS, (stop - 1) // _CHUNK_DRAWS + 1 if stop > start else 0):
            sources = self._chunk_sources(chunk)
            indices = np.empty(_CHUNK_DRAWS, dtype=np.int64)
            for source, before in enumerate(self._counts(chunk)):
                where = np.flatnonzero(sources == source)
                occurrence = before + np.arange(len(where))  # the n-th draw of this source overall
                size = int(self.sizes[source])
                local = np.empty(len(where), dtype=np.int64)
                for source_epoch in np.unique(occurrence // size):
                    mask = occurrence // size == source_epoch
                    local[mask] = self._permutation(source, int(source_epoch))[occurrence[mask] % size]
                indices[where] = self.offsets[source] + local
            base = chunk * _CHUNK_DRAWS
            out.append(indices[max(start, base) - base : min(stop, base + _CHUNK_DRAWS) - base])
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    # ------------------------------------------------------------------------------ the sampler
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, items_done: int) -> None:
        """Skip ``items_done`` of this rank's items the next time epoch ``epoch`` is iterated."""
        self._skip = (epoch, items_done)

    def state_dict(self) -> dict[str, int]:
        """The position as all ranks' draws consumed, at the start of the current epoch plus any skip."""
        done = self._skip[1] if self._skip and self._skip[0] == self.epoch else 0
        return {"draws": (self.epoch * self.per_rank + done) * self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after ``state["draws"]`` draws (all ranks together)."""
        per_epoch = self.per_rank * self.world_size
        self.epoch = int(state["draws"]) // per_epoch
        self._skip = (self.epoch, (int(state["draws"]) % per_epoch) // self.world_size)

    def __iter__(self) -> Iterator[int]:
        done = self._skip[1] if self._skip and self._skip[0] == self.epoch else 0
        self._skip = None
        first = self.epoch * self.per_rank + done  # this rank's item number
        last = (self.epoch + 1) * self.per_rank
        step = _CHUNK_DRAWS
        for item in range(first, last, step):
            count = min(step, last - item)
            start = item * self.world_size
            draws = self.draws(start, start + count * self.world_size)
            yield from draws[self.rank :: self.world_size].tolist()

    def __len__(self) -> int:
        return self.per_rank

    def source_counts(self, n_draws: int) -> np.ndarray:
        """Draws of each source among the first ``n_draws`` (to check proportions)."""
        return np.bincount(
            np.searchsorted(self.offsets, self.draws(0, n_draws), side="right") - 1, minlength=len(self.sizes)
        )
