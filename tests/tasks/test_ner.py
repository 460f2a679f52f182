"""Token classification (NER): word-level metrics by hand and by seqeval, and fine-tuning on CoNLL files."""

from __future__ import annotations

import json

import pytest
import torch

from lmexp.tasks.metrics import IGNORE_INDEX
from lmexp.tasks.ner import TagMetrics, entity_f1, is_bio
from lmexp.train import train
from tests.tasks.helpers import FINETUNE_TINY, ner_rows, pretrained_checkpoint, write_conll

TAGS = ["B-LOC", "B-PER", "I-PER", "O"]


def test_bio_detection():
    assert is_bio(TAGS)
    assert not is_bio(["O"]) and not is_bio(["NOUN", "VERB"]) and not is_bio(["B-X", "E-X"])


def test_entity_f1_matches_hand_count():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-PER"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["O", "B-LOC"]]
    # entities: true {PER(0-1), LOC(3), PER(s2)}, predicted {PER(0-1), LOC(s2)}: 1 exact match
    precision, recall = 1 / 2, 1 / 3
    assert entity_f1(true, pred) == pytest.approx(2 * precision * recall / (precision + recall))


def test_tag_metrics_count_words_only():
    index = {tag: i for i, tag in enumerate(TAGS)}
    # two sentences as sub-tokens; -100 marks continuation pieces, specials and padding
    labels = torch.tensor(
        [
            [IGNORE_INDEX, index["B-PER"], IGNORE_INDEX, index["I-PER"], index["O"], IGNORE_INDEX],
            [IGNORE_INDEX, index["B-LOC"], index["O"], IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
        ]
    )
    preds = torch.tensor(
        [
            [3, index["B-PER"], 0, index["I-PER"], index["B-LOC"], 0],  # non-word positions are ignored
            [3, index["B-LOC"], index["O"], 1, 1, 1],
        ]
    )
    metrics = TagMetrics(TAGS)
    metrics.update(preds, labels, torch.tensor(1.0))
    values = {k: float(v) for k, v in metrics.compute().items()}
    assert values["acc"] == pytest.approx(4 / 5)
    # per tag (tp, fp, fn): B-LOC (1, 1, 0), B-PER (1, 0, 0), I-PER (1, 0, 0), O (1, 0, 1)
    f1 = [2 / 3, 1.0, 1.0, 2 / 3]
    assert values["f1"] == pytest.approx(sum(f1) / 4)
    true = [["B-PER", "I-PER", "O"], ["B-LOC", "O"]]
    pred = [["B-PER", "I-PER", "B-LOC"], ["B-LOC", "O"]]
    assert values["entity_f1"] == pytest.approx(entity_f1(true, pred))


@pytest.mark.slow
def test_ner_fine_tuning_on_conll_learns(tmp_path_factory, tmp_path, config, cache_dir):
    ckpt = pretrained_checkpoint("bert", tmp_path_factory.getbasetemp() / "pretrained", cache_dir)
    files = {split: write_conll(tmp_path / f"{split}.conll", ner_rows(n, seed)) for split, n, seed in
             (("train", 400, 1), ("val", 60, 2), ("test", 60, 3))}  # fmt: skip
    metrics = train(
        config(
            *FINETUNE_TINY, "task=ner", "data=conll", f"init_from={ckpt}", "optim.lr=1e-2",
            *(f"data.{split}_path={path}" for split, path in files.items()),
            run_dir=tmp_path / "run",
        )
    )  # fmt: skip
    assert {"val/acc", "val/f1", "val/entity_f1", "test/acc", "test/f1", "test/entity_f1"} <= set(metrics)
    # Tagging every word O would score the share of O words: the tagger must do clearly better.
    val_tags = [tag for row in ner_rows(60, 2) for tag in row["tags"]]
    assert metrics["val/acc"] > val_tags.count("O") / len(val_tags) + 0.1
    assert metrics["val/entity_f1"] > 0.3
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["lmexp"]["labels"] == ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == pytest.approx(metrics)
