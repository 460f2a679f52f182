"""Tests for sentence splitting and NSP sentence-pair examples (lmexp.data.pairs)."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lmexp.data.pairs import PairExamples, PairSpecials, build_pair_examples, split_sentences
from lmexp.errors import ConfigError, DataError

SPECIALS = PairSpecials(cls_id=5, sep_id=6, pad_id=0)


def make_documents(n_documents: int, seed: int = 0, max_sentence: int = 12) -> list[list[list[int]]]:
    """Documents of 2 to 30 sentences of 1 to ``max_sentence`` random ids (never a special id)."""
    rng = random.Random(seed)
    return [
        [
            [rng.randrange(10, 3000) for _ in range(rng.randint(1, max_sentence))]
            for _ in range(rng.randint(2, 30))
        ]
        for _ in range(n_documents)
    ]


def flat(sentences: list[list[int]]) -> list[int]:
    return list(itertools.chain.from_iterable(sentences))


def example_parts(examples: PairExamples, i: int) -> tuple[list[int], list[int]]:
    """A and B of example ``i``, read back from its input_ids and checked against its layout."""
    item = examples[i]
    ids, types, attention = (item[k].tolist() for k in ("input_ids", "token_type_ids", "attention_mask"))
    n_a, n_b = int(examples.a_len[i]), int(examples.b_len[i])
    assert ids[0] == SPECIALS.cls_id and ids[1 + n_a] == SPECIALS.sep_id
    a = ids[1 : 1 + n_a]
    if examples.nsp:
        end = 2 + n_a + n_b + 1
        assert ids[end - 1] == SPECIALS.sep_id
        b = ids[2 + n_a : end - 1]
        assert types == [0] * (2 + n_a) + [1] * (n_b + 1) + [0] * (len(ids) - end)
    else:
        end, b = 2 + n_a, []
        assert types == [0] * len(ids)
    assert attention == [1] * end + [0] * (len(ids) - end)
    assert ids[end:] == [SPECIALS.pad_id] * (len(ids) - end)
    assert SPECIALS.cls_id not in a + b and SPECIALS.sep_id not in a + b
    return a, b


@pytest.fixture(scope="module")
def documents() -> list[list[list[int]]]:
    return make_documents(200)


@pytest.fixture(scope="module")
def pairs(documents: list[list[list[int]]]) -> PairExamples:
    return build_pair_examples(documents, 64, SPECIALS, nsp=True, seed=0)


def test_pair_layout_and_provenance(documents: list[list[list[int]]], pairs: PairExamples) -> None:
    assert pairs.input_ids.shape == (len(pairs), 64)
    for i in range(len(pairs)):
        a, b = example_parts(pairs, i)
        doc_a, doc_b = int(pairs.doc_a[i]), int(pairs.doc_b[i])
        assert a == flat(documents[doc_a][pairs.a_start[i] : pairs.a_end[i]])
        assert b == flat(documents[doc_b][pairs.b_start[i] : pairs.b_end[i]])
        assert a and b and len(a) + len(b) + 3 <= 64
        assert len(a) <= (64 - 3) // 2  # A fills about half the budget
        if pairs.nsp_label[i] == 0:  # IsNext: B is the run right after A in the same document
            assert doc_a == doc_b and pairs.a_end[i] == pairs.b_start[i]
        else:
            assert doc_a != doc_b


def test_items_are_int64_tensors(pairs: PairExamples) -> None:
    item = pairs[-1]
    assert set(item) == {"input_ids", "token_type_ids", "attention_mask", "nsp_label"}
    assert all(t.dtype == torch.int64 for t in item.values())
    assert item["nsp_label"].shape == ()
    with pytest.raises(IndexError):
        pairs[len(pairs)]
    batch = next(iter(DataLoader(pairs, batch_size=4)))
    assert batch["input_ids"].shape == (4, 64) and batch["nsp_label"].shape == (4,)


def test_label_balance(pairs: PairExamples) -> None:
    assert pairs.nsp_label.mean() == pytest.approx(0.5, abs=0.06)


def test_documents_walked_once(documents: list[list[list[int]]], pairs: PairExamples) -> None:
    """Every sentence is used exactly once as A or as an IsNext B of its own document."""
    used = [np.zeros(len(doc), dtype=int) for doc in documents]
    for i in range(len(pairs)):
        used[pairs.doc_a[i]][pairs.a_start[i] : pairs.a_end[i]] += 1
        if pairs.nsp_label[i] == 0:
            used[pairs.doc_b[i]][pairs.b_start[i] : pairs.b_end[i]] += 1
    assert all((counts == 1).all() for counts in used)


@pytest.mark.parametrize("nsp_prob", [0.0, 0.2, 1.0])
def test_nsp_prob(documents: list[list[list[int]]], nsp_prob: float) -> None:
    examples = build_pair_examples(documents, 64, SPECIALS, nsp=True, seed=1, nsp_prob=nsp_prob)
    rate = examples.nsp_label.mean()
    if nsp_prob == 1.0:
        assert rate == 1.0
    else:
        # Only a document's lone last sentence is forced to NotNext, which nudges the rate up a little.
        assert nsp_prob <= rate <= nsp_prob + 0.08


def test_deterministic_for_a_seed(documents: list[list[list[int]]], pairs: PairExamples) -> None:
    again = build_pair_examples(documents, 64, SPECIALS, nsp=True, seed=0)
    other = build_pair_examples(documents, 64, SPECIALS, nsp=True, seed=1)
    assert np.array_equal(pairs.input_ids, again.input_ids)
    assert np.array_equal(pairs.nsp_label, again.nsp_label)
    assert not np.array_equal(pairs.nsp_label[:50], other.nsp_label[:50])


def test_single_segments_without_nsp(documents: list[list[list[int]]]) -> None:
    examples = build_pair_examples(documents, 32, SPECIALS, nsp=False, seed=0)
    assert examples.nsp_label is None and "nsp_label" not in examples[0]
    assert (examples.doc_b == -1).all()
    for i in range(len(examples)):
        a, _ = example_parts(examples, i)
        assert a == flat(documents[examples.doc_a[i]][examples.a_start[i] : examples.a_end[i]])
        assert 1 <= len(a) <= 32 - 2
    # Consecutive examples of a document continue where the previous one stopped, from sentence 0 to the end.
    for d, doc in enumerate(documents):
        rows = np.flatnonzero(examples.doc_a == d)
        assert examples.a_start[rows[0]] == 0 and examples.a_end[rows[-1]] == len(doc)
        assert (examples.a_start[rows[1:]] == examples.a_end[rows[:-1]]).all()


def test_long_sentences_are_cut_not_dropped() -> None:
    long_doc = [list(range(100, 200)), [7, 8, 9]]
    other = [[11, 12], [13]]
    single = build_pair_examples([long_doc, other], 16, SPECIALS, nsp=False, seed=0)
    text = flat(example_parts(single, i)[0] for i in range(len(single)) if single.doc_a[i] == 0)
    assert text == flat(long_doc)
    pairs = build_pair_examples([long_doc, other], 16, SPECIALS, nsp=True, seed=0)
    for i in range(len(pairs)):
        a, b = example_parts(pairs, i)
        assert len(a) + len(b) + 3 <= 16


def test_smallest_length_and_empty_parts() -> None:
    documents = [[[20, 21, 22, 23]], [], [[], [30], [31, 32]], [[40]]]
    examples = build_pair_examples(documents, 8, SPECIALS, nsp=True, seed=3)
    assert examples.input_ids.shape[1] == 8
    assert 1 not in set(examples.doc_a.tolist()) | set(examples.doc_b.tolist())  # empty document skipped
    for i in range(len(examples)):
        a, b = example_parts(examples, i)
        assert a and b


def test_one_document_with_nsp_is_a_data_error() -> None:
    with pytest.raises(DataError, match="NSP needs at least 2 documents in the val split") as info:
        build_pair_examples([[[10, 11]], [], [[]]], 16, SPECIALS, nsp=True, seed=0, split="val")
    assert "\n" not in str(info.value) and "task.nsp=false" in str(info.value)
    with pytest.raises(DataError, match="NSP needs at least 2 documents"):
        build_pair_examples([[[10, 11]]], 16, SPECIALS, nsp=True, seed=0)
    single = build_pair_examples([[[10, 11]]], 16, SPECIALS, nsp=False, seed=0)
    assert len(single) == 1


def test_no_text_is_a_data_error() -> None:
    with pytest.raises(DataError, match="no text"):
        build_pair_examples([[], [[]]], 16, SPECIALS, nsp=False, seed=0, split="test")


@pytest.mark.parametrize("max_len", [7, 0, 7.5, True])
def test_short_max_len_is_a_config_error(max_len: object) -> None:
    with pytest.raises(ConfigError, match=r"data\.block_size"):
        build_pair_examples(make_documents(3), max_len, SPECIALS, nsp=True, seed=0)


def test_bad_nsp_prob_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"task\.nsp_prob=1\.5") as info:
        build_pair_examples(make_documents(3), 4, SPECIALS, nsp=True, seed=0, nsp_prob=1.5)
    assert "data.block_size" in str(info.value)  # every problem at once


def test_large_ids_widen_the_storage() -> None:
    documents = [[[70_000, 10]], [[11, 12]]]
    examples = build_pair_examples(documents, 8, SPECIALS, nsp=False, seed=0)
    assert examples[0]["input_ids"][1].item() == 70_000
    small = build_pair_examples(make_documents(3), 8, SPECIALS, nsp=False, seed=0)
    assert small.input_ids.dtype == np.uint16


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello world. How are you? Fine!", ["Hello world.", "How are you?", "Fine!"]),
        ("No punctuation at the end", ["No punctuation at the end"]),
        ("Pi is 3.14 today. Yes.", ["Pi is 3.14 today.", "Yes."]),
        ("Wait... what?!  Really", ["Wait...", "what?!", "Really"]),
        ('He said "Hi." Then left.', ['He said "Hi."', "Then left."]),
        ("(A note.) Next one", ["(A note.)", "Next one"]),
        ("first line\nsecond line. third\n\n  \nlast", ["first line", "second line.", "third", "last"]),
        ("a.b.c", ["a.b.c"]),
        ("Tab.\tSeparated", ["Tab.", "Separated"]),
        ("", []),
        ("  \n \n", []),
    ],
)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected
