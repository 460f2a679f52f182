"""Token classification (NER) as a LightningModule: one tag per word from the word's first sub-token.

The data module labels only each word's first sub-token (the others are -100), so the loss and the
metrics are per word. Metrics: ``acc`` and macro ``f1`` over the tags (torchmetrics), and, when the tags
follow the BIO scheme, ``entity_f1``: exact span match, computed by seqeval over whole sentences.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lmexp.config.schema import between
from lmexp.tasks.classify import ClassificationMetrics, ClassifyConfig, SequenceClassificationTask, new_head
from lmexp.tasks.metrics import IGNORE_INDEX

_BIO_TAG = re.compile(r"^(O|[BI]-.+)$")


@dataclass
class NERConfig(ClassifyConfig):
    """``conf/task/ner.yaml``: one tag per word, from a fresh head on every token's state."""

    task_class: ClassVar[str] = "lmexp.tasks.ner.TokenClassificationTask"

    classifier_dropout: float = between(0.1, 0.0, 1.0, high_open=True)
    """Dropout before the tagging head, in [0, 1)."""


def is_bio(tags: list[str]) -> bool:
    """Whether every tag is ``O``, ``B-<type>`` or ``I-<type>`` (and at least one names an entity)."""
    return all(_BIO_TAG.match(tag) for tag in tags) and any(tag != "O" for tag in tags)


def entity_f1(true_tags: list[list[str]], pred_tags: list[list[str]]) -> float:
    """Entity-level F1 (exact span and type match) as seqeval computes it, over whole sentences."""
    from seqeval.metrics import f1_score

    return float(f1_score(true_tags, pred_tags, zero_division=0))


class TokenClassifier(nn.Module):
    """``input_ids`` (B, T) and ``attention_mask`` (B, T) -> tag logits (B, T, K) for every token."""

    def __init__(self, backbone: nn.Module, n_labels: int, dropout: float) -> None:
        super().__init__()
        backbone.drop_pretraining_heads(keep_pooler=False)
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.classifier = new_head(backbone.config.hidden_width, n_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone.token_states(input_ids, attention_mask)  # (B, T, C)
        return self.classifier(self.dropout(hidden))  # (B, T, K)


class EntityF1(Metric):
    """seqeval's entity F1 over the sentences of a split; per-word tag ids are gathered across ranks."""

    full_state_update = False

    def __init__(self, labels: list[str]) -> None:
        super().__init__()
        self.labels = list(labels)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("lengths", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        """``preds`` and ``labels`` (B, T); positions with label -100 are not words."""
        words = labels != IGNORE_INDEX  # (B, T)
        self.preds.append(preds[words])
        self.target.append(labels[words])
        self.lengths.append(words.sum(dim=1))

    def compute(self) -> torch.Tensor:
        lengths = dim_zero_cat(self.lengths).tolist()
        preds = dim_zero_cat(self.preds).tolist()
        target = dim_zero_cat(self.target).tolist()
        true_tags, pred_tags, start = [], [], 0
        for n in lengths:
            true_tags.append([self.labels[i] for i in target[start : start + n]])
            pred_tags.append([self.labels[i] for i in preds[start : start + n]])
            start += n
        return torch.tensor(entity_f1(true_tags, pred_tags))


class TagMetrics(ClassificationMetrics):
    """Word-level ``loss``, ``acc``, macro ``f1``, and ``entity_f1`` when the tags are BIO."""

    def __init__(self, labels: list[str]) -> None:
        super().__init__(labels)
        for name in ("precision", "recall"):  # not part of the NER report
            del self.metrics[name]
        self.entities = EntityF1(labels) if is_bio(labels) else None

    @torch.no_grad()
    def update(self, preds: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        n = (labels != IGNORE_INDEX).sum()
        self.metrics["loss"].update(loss, weight=n)
        for name in ("acc", "f1"):
            self.metrics[name].update(preds.flatten(), labels.flatten())
        if self.entities is not None:
            self.entities.update(preds, labels)

    def compute(self) -> dict[str, torch.Tensor]:
        values = dict(self.metrics.compute())
        if self.entities is not None:
            values["entity_f1"] = self.entities.compute()
        return values

    def reset(self) -> None:
        self.metrics.reset()
        if self.entities is not None:
            self.entities.reset()


class TokenClassificationTask(SequenceClassificationTask):
    """Fine-tunes ``model`` with a fresh per-token head to tag every word (``labels`` are the tags)."""

    name = "ner"
    data_format = "ner"
    data_hint = "reads labelled examples: add data=jsonl or data=conll with data.train_path and data.val_path"
    metrics = ("loss", "acc", "f1", "entity_f1")  # entity_f1 when the tags are BIO

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.train_metrics = TagMetrics(self.labels)
        self.val_metrics = TagMetrics(self.labels)
        self.test_metrics = TagMetrics(self.labels)

    def build_head(self, backbone: nn.Module, dropout: float) -> nn.Module:
        return TokenClassifier(backbone, len(self.labels), dropout)

    def collect(self, batch: dict[str, torch.Tensor], preds: torch.Tensor) -> None:
        """Keep each sentence's predicted tag ids, one per word that fit in the example."""
        words = batch["labels"] != IGNORE_INDEX  # (B, T)
        for index, row_preds, row_words in zip(batch["index"].tolist(), preds, words, strict=True):
            self.predictions.append((index, row_preds[row_words].tolist()))
