"""SQuAD exact match and F1 against hand-computed cases (lmexp.tasks.squad_metrics)."""

from __future__ import annotations

import pytest
import torch

from lmexp.tasks.squad_metrics import (
    SquadMetric,
    best_over_golds,
    exact_match,
    f1,
    normalize_answer,
    squad_scores,
)


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("The  Quick, brown fox!", "quick brown fox"),
        ("Theatre and an apple", "theatre and apple"),  # articles go only as whole words
        ("Anne ate a pear", "anne ate pear"),
        ("U.S.A.", "usa"),  # punctuation is deleted, not replaced by a space
        ("well-known don't", "wellknown dont"),
        ("«Paris»", "«paris»"),  # only ASCII punctuation, as in the official script
        ("  \tthe\n", ""),
        ("", ""),
    ],
)
def test_normalize_answer(text: str, normalised: str) -> None:
    assert normalize_answer(text) == normalised


def test_exact_match() -> None:
    assert exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert exact_match("Eiffel", "Eiffel tower") == 0.0
    assert exact_match("«Paris»", "Paris") == 0.0


def test_f1_by_hand() -> None:
    # prediction words (after normalisation) big red dog barked; gold red dog: 2 common
    assert f1("the big red dog barked", "a red dog") == pytest.approx(2 * (2 / 4) * (2 / 2) / (2 / 4 + 2 / 2))
    # repeated words count as often as they occur in both: 1 common "dog"
    assert f1("dog dog dog", "dog cat") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert f1("Paris", "London") == 0.0
    assert f1("The Eiffel Tower!", "eiffel tower") == 1.0


def test_empty_answers() -> None:
    assert f1("", "") == 1.0 and exact_match("", "") == 1.0
    assert f1("the", "") == 1.0  # normalises to nothing: the same as no answer
    assert f1("", "Paris") == 0.0 and f1("Paris", "") == 0.0


def test_max_over_golds() -> None:
    golds = ["Denver Broncos", "Broncos", "the Broncos"]
    assert best_over_golds(exact_match, "broncos", golds) == 1.0
    assert best_over_golds(exact_match, "Broncos win", golds) == 0.0
    # vs "denver broncos": p=1/2 r=1/2 -> 1/2; vs "broncos": p=1/2 r=1 -> 2/3
    assert best_over_golds(f1, "Broncos win", golds) == pytest.approx(2 / 3)


def test_unanswerable_questions() -> None:
    for golds in ([], [""], ["the"], ["  .  "]):  # no gold, or only golds that normalise to nothing
        assert best_over_golds(exact_match, "", golds) == 1.0
        assert best_over_golds(f1, "an", golds) == 1.0
        assert best_over_golds(exact_match, "Paris", golds) == 0.0
        assert best_over_golds(f1, "Paris", golds) == 0.0
    # an empty gold next to a real one is dropped: the question is answerable
    assert best_over_golds(f1, "", ["", "Paris"]) == 0.0


def test_squad_scores_are_fractions_and_missing_predictions_score_zero() -> None:
    references = {"q1": ["Denver Broncos"], "q2": [], "q3": ["red dog"], "q4": ["Paris"]}
    predictions = {"q1": "the Denver Broncos", "q2": "", "q3": "big red dog", "extra": "ignored"}
    scores = squad_scores(predictions, references)
    assert scores["exact_match"] == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert scores["f1"] == pytest.approx((1 + 1 + 0.8 + 0) / 4)  # q3: p=2/3 r=1 -> 0.8


def test_metric_accumulates_like_squad_scores() -> None:
    references = {"a": ["red dog"], "b": [], "c": ["Broncos", "Denver Broncos"], "d": ["1901"]}
    predictions = {"a": "big red dog", "b": "", "c": "Denver", "d": "in 1901"}
    metric = SquadMetric()
    metric.update([predictions["a"], predictions["b"]], [references["a"], references["b"]])
    metric.update([predictions["c"], predictions["d"]], [references["c"], references["d"]])
    result = metric.compute()
    expected = squad_scores(predictions, references)
    assert set(result) == {"exact_match", "f1"}
    assert float(result["exact_match"]) == pytest.approx(expected["exact_match"])
    assert float(result["f1"]) == pytest.approx(expected["f1"])
    metric.reset()
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metric.update(["a", "b"], [["a"]])
    assert isinstance(result["f1"], torch.Tensor)
