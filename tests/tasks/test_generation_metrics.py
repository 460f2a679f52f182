"""lmexp.tasks.generation_metrics against values known independently of the code under test."""

from __future__ import annotations

import pytest

from lmexp.errors import DataError
from lmexp.tasks.generation_metrics import generation_metrics

# sacrebleu's README example: BLEU = 48.53, chrF2 = 59.73 for this system output and two reference streams.
SYSTEM = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
STREAMS = [
    ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
]


def test_sacrebleus_published_example():
    references = [list(refs) for refs in zip(*STREAMS, strict=True)]  # per example: both references
    corpus, rows = generation_metrics(SYSTEM, references)
    assert corpus["bleu"] == pytest.approx(48.53, abs=0.005)
    assert corpus["chrf"] == pytest.approx(59.73, abs=0.005)
    assert corpus["exact_match"] == pytest.approx(1 / 3)  # the first sentence equals a reference
    assert rows[0] == {"exact_match": 1.0, "rougeL": 1.0, "chrf": 100.0, "bleu": pytest.approx(100.0)}
    assert all(type(value) is float for row in [corpus, *rows] for value in row.values())


def test_identical_texts_score_full_marks():
    texts = ["the old dog runs near the house", "some cats that see the dogs sleep"]
    corpus, rows = generation_metrics(texts, texts)
    assert corpus == {"exact_match": 1.0, "rougeL": 1.0, "chrf": 100.0, "bleu": pytest.approx(100.0)}
    assert rows == [corpus] * 2


def test_rouge_l_is_the_longest_common_subsequence_f_measure():
    # LCS of "the cat was on the mat" and "the cat sat on the mat" is "the cat on the mat": 5 of 6 words
    _, [row] = generation_metrics(["the cat was on the mat"], ["the cat sat on the mat"])
    assert row["rougeL"] == pytest.approx(5 / 6)
    assert row["exact_match"] == 0.0
    _, [row] = generation_metrics(["the cat"], ["the cat sat on the mat"])  # P = 1, R = 2/6
    assert row["rougeL"] == pytest.approx(2 * 1 * (2 / 6) / (1 + 2 / 6))


def test_exact_match_normalises_whitespace_only():
    _, rows = generation_metrics(["  a   b\tc \n", "A b c", "a b c."], ["a b c"] * 3)
    assert [row["exact_match"] for row in rows] == [1.0, 0.0, 0.0]


def test_a_varying_number_of_references():
    # BLEU clips n-gram counts by the max over references and takes the closest reference length, so a
    # repeated reference changes nothing: one reference for the first example = that one twice.
    predictions = ["the dog bit the man today", "a cat sat on a mat"]
    references = [["the dog bit a man today"], ["the cat sat on the mat", "a cat sat on a mat"]]
    repeated = [["the dog bit a man today"] * 2, references[1]]
    corpus, rows = generation_metrics(predictions, references)
    corpus_repeated, _ = generation_metrics(predictions, repeated)
    assert corpus == pytest.approx(corpus_repeated)
    assert rows[1]["exact_match"] == 1.0 and rows[1]["rougeL"] == 1.0  # the best reference counts


def test_bad_input_is_a_data_error():
    with pytest.raises(DataError, match="2 predictions but 1 references"):
        generation_metrics(["a", "b"], ["a"])
    with pytest.raises(DataError, match="no predictions"):
        generation_metrics([], [])
    with pytest.raises(DataError, match="references of example 0: expected one or more texts"):
        generation_metrics(["a"], [[]])
