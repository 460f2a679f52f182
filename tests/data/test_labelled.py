"""Labelled data: JSON-lines and CoNLL readers, one-line errors, sub-token label alignment, batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmexp.data.context import DataContext
from lmexp.data.labelled import LabelledDataConfig, PadCollator, align_word_labels, read_records
from lmexp.data.packing import IGNORE_INDEX
from lmexp.data.tokenizer import TokenizerConfig
from lmexp.errors import ConfigError, DataError

FIELDS = {"text": "text", "label": "label", "tokens": "tokens", "tags": "tags"}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join(json.dumps(row) + "\n" for row in rows))


def test_readers(tmp_path):
    rows = read_records(
        jsonl(tmp_path / "c.jsonl", [{"text": "a b", "label": "x"}, {"text": "c", "label": 3}]),
        "data.train_path", "classify", "jsonl", FIELDS,
    )  # fmt: skip
    assert [(r.text, r.label, r.line) for r in rows] == [("a b", "x", 1), ("c", "3", 2)]
    conll = write(tmp_path / "n.conll", "-DOCSTART- -X- O\n\nEU NNP B-ORG\nrejects VBZ O\n\n\nPeter B-PER\n")
    rows = read_records(conll, "data.train_path", "ner", "conll", FIELDS)
    assert [(r.tokens, r.tags, r.line) for r in rows] == [
        (["EU", "rejects"], ["B-ORG", "O"], 3),
        (["Peter"], ["B-PER"], 7),
    ]


@pytest.mark.parametrize(
    ("kind", "fmt", "text", "message"),
    [
        ("classify", "jsonl", '{"text": "a", "label": "x"}\n{"text": "b", \n', r"line 2: malformed JSON"),
        ("classify", "jsonl", '{"text": "a"}\n', r"line 1: has no field 'label'"),
        ("classify", "jsonl", "[1, 2]\n", r"line 1: expected a JSON object, got list"),
        ("ner", "jsonl", '{"tokens": ["a", "b"], "tags": ["O"]}\n', r"line 1: 2 tokens but 1 tags"),
        ("ner", "jsonl", '{"tokens": ["a"]}\n', r"line 1: has no field 'tags'"),
        ("ner", "conll", "a O\nb\n", r"line 2: expected a token and its tag"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, kind, fmt, text, message):
    path = write(tmp_path / f"bad.{fmt}", text)
    with pytest.raises(DataError, match=rf"data.val_path: {path} {message}"):
        read_records(path, "data.val_path", kind, fmt, FIELDS)


def test_first_sub_token_carries_the_label():
    # words of 2, 1 and 3 pieces, labels 5, 6, 7; budget 6 fits the first two words whole
    ids, labels = align_word_labels([[10, 11], [12], [13, 14, 15]], [5, 6, 7], budget=6, unk_id=1)
    assert ids == [10, 11, 12, 13, 14, 15]
    assert labels == [5, IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX]
    ids, labels = align_word_labels([[10, 11], [12], [13, 14, 15]], [5, 6, 7], budget=4, unk_id=1)
    assert (ids, labels) == ([10, 11, 12], [5, IGNORE_INDEX, 6])  # the third word does not fit whole
    assert align_word_labels([[]], [4], budget=3, unk_id=1) == ([1], [4])  # an empty word becomes unk


def make_data(tmp_path, kind, train_rows, val_rows, layout="eos", vocab_size=300, **settings):
    config = LabelledDataConfig(
        train_path=str(jsonl(tmp_path / "train.jsonl", train_rows)),
        val_path=str(jsonl(tmp_path / "val.jsonl", val_rows)),
        **settings,
    )
    tokenizer = TokenizerConfig(vocab_size=vocab_size, extra_special_tokens=["[CLS]", "[SEP]"])
    return config.build(DataContext(tokenizer, tmp_path / "cache", example_format=kind, layout=layout))


def test_ner_examples_are_aligned_with_the_tokenizer(tmp_path):
    rows = [{"tokens": ["the", "elephant", "ate", "Zürich"], "tags": ["O", "B-ANI", "O", "B-LOC"]}] * 30
    data = make_data(tmp_path, "ner", rows, rows[:2], layout="cls_sep", block_size=64)
    data.prepare()
    tokenizer, example = data.tokenizer, data.datasets["train"][0]
    assert data.labels == ["B-ANI", "B-LOC", "O"]
    pieces = [tokenizer.encode([word])[0] for word in rows[0]["tokens"]]
    expected_ids = [tokenizer.special_id("[CLS]")] + sum(pieces, []) + [tokenizer.special_id("[SEP]")]
    assert example["input_ids"] == expected_ids
    # The pieces of the whole sentence are the words' pieces one after another.
    assert tokenizer.encode([" ".join(rows[0]["tokens"])])[0] == sum(pieces, [])
    starts = [i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX]
    assert starts == [1 + sum(len(p) for p in pieces[:k]) for k in range(4)]
    assert [example["labels"][i] for i in starts] == [2, 0, 2, 1]


def test_classify_batches_pad_on_the_right(tmp_path):
    rows = [{"text": "a cat", "label": "pet"}, {"text": "a big old bus", "label": "car"}] * 10
    data = make_data(tmp_path, "classify", rows, rows[:2], layout="eos", vocab_size=280)
    data.prepare()
    batch = PadCollator(data.tokenizer.pad_id)([data.datasets["val"][0], data.datasets["val"][1]])
    short, long = (len(data.datasets["val"][i]["input_ids"]) for i in (0, 1))
    assert batch["attention_mask"].sum(dim=1).tolist() == [short, long]
    assert batch["input_ids"][0, 0] == data.tokenizer.eos_id and batch["input_ids"][0, short:].eq(0).all()
    assert batch["labels"].tolist() == [1, 0] and torch.equal(batch["index"], torch.tensor([0, 1]))


def test_label_set_and_split_errors(tmp_path):
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    with pytest.raises(DataError, match=r"val.jsonl line 1: label 'z' does not occur in the training split"):
        make_data(tmp_path, "classify", rows, [{"text": "c", "label": "z"}]).prepare()
    with pytest.raises(DataError, match=r"data.val_path: .*val.jsonl has no examples"):
        make_data(tmp_path, "classify", rows, []).prepare()
    context = DataContext(TokenizerConfig(), tmp_path, example_format="classify")
    with pytest.raises(ConfigError, match="data.val_path is not set"):
        LabelledDataConfig(train_path="t.jsonl").build(context)
    with pytest.raises(ConfigError, match="use it with task=ner"):
        LabelledDataConfig(format="conll", train_path="a", val_path="b").build(context)
