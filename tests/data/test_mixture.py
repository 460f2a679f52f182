"""Tests for mixtures of sources (lmexp.data.mixture): proportions, ranks, resuming, source stamps."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from lmexp.data.mixture import MixtureDataset, MixtureSampler
from lmexp.data.sampling import ResumableLoader
from lmexp.errors import ConfigError

SIZES, WEIGHTS = [50, 7, 300], [2.0, 1.0, 1.0]


class Items(Dataset):
    def __init__(self, n: int, tag: int) -> None:
        self.n, self.tag = n, tag

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"value": torch.tensor(self.tag * 1000 + i), "source": torch.tensor(-1)}


def test_draws_follow_the_weights_and_are_deterministic() -> None:
    sampler = MixtureSampler(SIZES, WEIGHTS, seed=3)
    counts = sampler.source_counts(40_000)
    assert np.allclose(counts / counts.sum(), [0.5, 0.25, 0.25], atol=0.01)
    assert np.array_equal(sampler.draws(0, 20_000), MixtureSampler(SIZES, WEIGHTS, seed=3).draws(0, 20_000))
    assert not np.array_equal(sampler.draws(0, 100), MixtureSampler(SIZES, WEIGHTS, seed=4).draws(0, 100))
    assert np.array_equal(sampler.draws(9000, 9100), sampler.draws(0, 9100)[9000:])  # random access


def test_each_pass_over_a_source_is_a_permutation() -> None:
    sampler = MixtureSampler(SIZES, WEIGHTS, seed=0)
    draws = sampler.draws(0, 4000)
    small = draws[(draws >= 50) & (draws < 57)] - 50  # the 7-block source, drawn ~1000 times
    passes = [small[k : k + 7] for k in range(0, len(small) - 6, 7)]
    assert len(passes) > 100 and all(sorted(p) == list(range(7)) for p in passes)
    assert len({tuple(p) for p in passes}) > 10  # a fresh order per pass


def test_ranks_take_disjoint_draws_that_make_up_the_whole() -> None:
    whole = MixtureSampler(SIZES, WEIGHTS, seed=1, epoch_draws=999).draws(0, 996)
    per_rank = [
        list(MixtureSampler(SIZES, WEIGHTS, seed=1, rank=r, world_size=3, epoch_draws=999)) for r in range(3)
    ]
    assert [len(items) for items in per_rank] == [333] * 3
    interleaved = [per_rank[r][i] for i in range(332) for r in range(3)]
    assert interleaved == whole.tolist()


def test_resuming_from_the_counter_continues_the_same_order() -> None:
    sampler = MixtureSampler(SIZES, WEIGHTS, seed=2, rank=1, world_size=2, epoch_draws=400)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    resumed = MixtureSampler(SIZES, WEIGHTS, seed=2, rank=1, world_size=2, epoch_draws=400)
    resumed.load_state_dict({"draws": 400 + 2 * 37})  # one epoch and 37 items of this rank
    assert list(resumed) == epoch1[37:]
    assert resumed.epoch == 1 and epoch0 != epoch1
    again = MixtureSampler(SIZES, WEIGHTS, seed=2, rank=1, world_size=2, epoch_draws=400)
    again.resume(0, 150)
    assert list(again) == epoch0[150:]
    assert again.state_dict() == {"draws": 0} and len(again) == 200


def test_the_resumable_loader_restores_a_mixture_position() -> None:
    dataset = MixtureDataset([Items(n, k) for k, n in enumerate(SIZES)], ["a", "b", "c"])
    sampler = MixtureSampler(dataset.sizes, WEIGHTS, seed=0, epoch_draws=64)
    loader = ResumableLoader(dataset, sampler, batch_size=4, progress=lambda: (0, 5))
    batches = [batch["value"].tolist() for batch in loader]
    state = loader.state_dict()
    fresh = ResumableLoader(
        dataset, MixtureSampler(dataset.sizes, WEIGHTS, 0, epoch_draws=64), 4, lambda: (0, 0)
    )
    fresh.load_state_dict(state)
    assert [batch["value"].tolist() for batch in fresh] == batches[5:]


def test_items_say_which_source_they_come_from() -> None:
    dataset = MixtureDataset([Items(n, k) for k, n in enumerate(SIZES)], ["a", "b", "c"])
    assert len(dataset) == sum(SIZES)
    assert dataset.locate(55) == (1, 5)
    item = dataset[55]
    assert int(item["value"]) == 1005 and int(item["source"]) == 1
    counts = Counter(int(dataset[i]["source"]) for i in MixtureSampler(SIZES, WEIGHTS, seed=0).draws(0, 2000))
    assert set(counts) == {0, 1, 2}
    with pytest.raises(IndexError):
        dataset[len(dataset)]


@pytest.mark.parametrize("weights", [[1.0, 0.0, 1.0], [1.0, -2.0, 1.0], [1.0, float("inf"), 1.0]])
def test_weights_must_be_positive(weights) -> None:
    with pytest.raises(ConfigError, match=r"data\.sources\.b\.weight=.*expected a number > 0"):
        MixtureSampler(SIZES, weights, names=["a", "b", "c"])


def test_an_empty_source_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"data\.sources\.b: has no blocks"):
        MixtureSampler([5, 0], [1.0, 1.0], names=["a", "b"])
