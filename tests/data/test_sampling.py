"""Evaluation batches that never mix sources, and the fixed subset scored by bounded validation."""

from __future__ import annotations

import numpy as np

from lmexp.data.sampling import EvaluationBatches, spaced_subset


def test_batches_keep_sources_apart_take_turns_and_cover_each_index_once() -> None:
    groups = [list(range(0, 7)), list(range(7, 10)), []]
    seen = []
    for rank in range(2):
        batches = list(EvaluationBatches(groups, batch_size=2, rank=rank, world_size=2))
        assert len(batches) == len(EvaluationBatches(groups, 2, rank, 2))
        for batch in batches:
            assert all(i < 7 for i in batch) or all(i >= 7 for i in batch)  # one source per batch
        seen += [i for batch in batches for i in batch]
    assert sorted(seen) == list(range(10))
    first = list(EvaluationBatches(groups, batch_size=2))
    assert first[:2] == [[0, 1], [7, 8]]  # round robin: a cut-short evaluation still sees every source
    assert EvaluationBatches(groups, 2, 0, 2).most_batches >= EvaluationBatches(groups, 2, 1, 2).most_batches


def test_spaced_subset_covers_the_range_and_is_fixed() -> None:
    assert spaced_subset(10, 0).tolist() == list(range(10))
    assert spaced_subset(10, 20).tolist() == list(range(10))
    keep = spaced_subset(1000, 5)
    assert keep.tolist() == [0, 250, 500, 749, 999]
    assert np.array_equal(keep, spaced_subset(1000, 5))
