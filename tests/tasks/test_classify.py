"""Sequence classification: metrics against hand counts, fine-tuning that learns, labels and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from lmexp.errors import CheckpointError, ConfigError, DataError
from lmexp.tasks.classify import ClassificationMetrics
from lmexp.train import train
from tests.tasks.helpers import finetune, pretrained_checkpoint, write_jsonl

CLASSIFY_KEYS = {"val/loss", "val/acc", "val/f1", "val/precision", "val/recall", "test/acc", "test/f1"}


@pytest.fixture
def pretrained(tmp_path_factory, cache_dir):
    root = tmp_path_factory.getbasetemp() / "pretrained"
    return lambda model: pretrained_checkpoint(model, root, cache_dir)


def test_metrics_match_hand_counts():
    # labels: a=0, b=1, c=2.  true: a a b c c c   pred: a b b c c a
    metrics = ClassificationMetrics(["a", "b", "c"], per_label=True)
    preds, labels = torch.tensor([0, 1, 1, 2, 2, 0]), torch.tensor([0, 0, 1, 2, 2, 2])
    metrics.update(preds, labels, torch.tensor(0.5))
    values = {k: float(v) for k, v in metrics.compute().items()}
    # per class (tp, fp, fn): a (1, 1, 1), b (1, 1, 0), c (2, 0, 1)
    precision = {"a": 1 / 2, "b": 1 / 2, "c": 2 / 2}
    recall = {"a": 1 / 2, "b": 1 / 1, "c": 2 / 3}
    f1 = {k: 2 * precision[k] * recall[k] / (precision[k] + recall[k]) for k in precision}
    assert values["acc"] == pytest.approx(4 / 6)
    assert values["precision"] == pytest.approx(sum(precision.values()) / 3)
    assert values["recall"] == pytest.approx(sum(recall.values()) / 3)
    assert values["f1"] == pytest.approx(sum(f1.values()) / 3)
    for label, value in f1.items():
        assert values[f"f1/{label}"] == pytest.approx(value)
    assert values["loss"] == pytest.approx(0.5)


@pytest.mark.slow
def test_gpt_fine_tuning_beats_chance(pretrained, tmp_path, cache_dir):
    # init_from takes a run dir: its checkpoints/last.ckpt
    run_dir = finetune(pretrained("gpt").parent.parent, "classify", tmp_path, cache_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert CLASSIFY_KEYS <= set(metrics)
    assert {"test/f1/animal", "test/f1/food", "test/f1/vehicle"} <= set(metrics)
    assert metrics["val/acc"] > 0.55 and metrics["test/acc"] > 0.55  # chance is 1/3
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["lmexp"]["labels"] == ["animal", "food", "vehicle"]  # sorted, from the train split
    # The run records the pre-trained model it really trained, and its tokenizer.
    pre = torch.load(pretrained("gpt"), weights_only=True)["lmexp"]
    assert checkpoint["lmexp"]["config"]["model"] == pre["config"]["model"]
    assert torch.equal(checkpoint["lmexp"]["tokenizer_model"], pre["tokenizer_model"])


@pytest.mark.slow
def test_bert_fine_tuning_beats_chance(pretrained, tmp_path, cache_dir):
    run_dir = finetune(pretrained("bert"), "classify", tmp_path, cache_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/acc"] > 0.55 and metrics["test/acc"] > 0.55


@pytest.mark.slow
def test_pretrained_weights_are_loaded(pretrained, config, cache_dir):
    from lmexp.training.build import build_run

    ckpt = pretrained("bert")
    _, _, task = build_run(
        config("task=classify", "data=jsonl", f"init_from={ckpt}", *_splits(config, cache_dir))
    )
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    backbone = task.model.backbone.state_dict()
    assert torch.equal(backbone["blocks.0.attn.qkv.weight"], state["model.blocks.0.attn.qkv.weight"])
    assert torch.equal(backbone["pooler.dense.weight"], state["model.pooler.dense.weight"])
    assert task.model.backbone.mlm_head is None  # pre-training heads are dropped


def _splits(config, cache_dir):
    from tests.tasks.helpers import labelled_splits

    return labelled_splits(cache_dir.parent / "classify-data", "classify", (64, 16, 16))


@pytest.mark.slow
def test_from_scratch_trains_a_tokenizer(tmp_path, cache_dir):
    run_dir = finetune(
        None, "classify", tmp_path, cache_dir, "tokenizer.vocab_size=300", "trainer.max_steps=4"
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert CLASSIFY_KEYS <= set(metrics)


@pytest.mark.slow
def test_bad_init_from_and_data(pretrained, config, tmp_path, cache_dir):
    splits = _splits(config, cache_dir)
    with pytest.raises(ConfigError, match="reads labelled examples: add data=jsonl"):
        train(config("task=classify"))
    with pytest.raises(CheckpointError, match="init_from=.*no such checkpoint"):
        train(config("task=classify", "data=jsonl", f"init_from={tmp_path}/none.ckpt", *splits))
    with pytest.raises(ConfigError, match="data.block_size=64 exceeds max_seq_len=32"):
        train(
            config(
                "task=classify", "data=jsonl", "data.block_size=64", f"init_from={pretrained('gpt')}", *splits
            )
        )
    # A BERT checkpoint whose tokenizer lacks [CLS] and [SEP] cannot feed a classifier.
    bert = torch.load(pretrained("bert"), weights_only=True)
    bert["lmexp"]["tokenizer_model"] = torch.load(pretrained("gpt"), weights_only=True)["lmexp"][
        "tokenizer_model"
    ]
    torch.save(bert, tmp_path / "mixed.ckpt")
    with pytest.raises(ConfigError, match=r"its tokenizer has no \[CLS\] or \[SEP\] token"):
        train(config("task=classify", "data=jsonl", f"init_from={tmp_path / 'mixed.ckpt'}", *splits))
    # Labels: an unseen label in val is named with its file and line.
    rows = [{"text": "a cat", "label": "animal"}, {"text": "a bus", "label": "vehicle"}]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows * 20)
    val_file = write_jsonl(tmp_path / "val.jsonl", [rows[0], {"text": "soup", "label": "food"}])
    paths = [f"data.train_path={train_file}", f"data.val_path={val_file}"]
    with pytest.raises(DataError, match=r"data.val_path: .*val.jsonl line 2: label 'food' does not occur"):
        train(config("task=classify", "data=jsonl", f"init_from={pretrained('gpt')}", *paths))


@pytest.mark.slow
def test_cli_error_is_one_line(cli, tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": "b" "label": "y"}\n')
    result = cli(
        "lmexp.train",
        "task=classify",
        "data=jsonl",
        f"data.train_path={bad}",
        f"data.val_path={bad}",
        forked=True,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: data.train_path: {bad} line 2: malformed JSON")
    assert "Traceback" not in result.stderr
