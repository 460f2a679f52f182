"""Sequence classification as a LightningModule: a pre-trained (or fresh) model plus a classification head.

The sentence vector is the model's ``pool`` (lmexp/models/registry.py): the pooled ``[CLS]`` for BERT (its
pre-trained pooler, as in Hugging Face's ``BertForSequenceClassification``), the last non-pad token's final
hidden state for GPT, and the last non-pad LSTM output for the LSTM. Metrics (torchmetrics, synced across
ranks): ``loss``, ``acc``, and macro ``f1``, ``precision``, ``recall``; on the test split also the F1 of
every label, ``f1/<label>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from lmexp.config.schema import between
from lmexp.tasks.base import Task, TaskConfig, TaskInputs, load_weights_into, pretrained_weights
from lmexp.tasks.metrics import IGNORE_INDEX


@dataclass
class ClassifyConfig(TaskConfig):
    """``conf/task/classify.yaml``: one label per text, from a fresh head on the model's sentence vector."""

    task_class: ClassVar[str] = "lmexp.tasks.classify.SequenceClassificationTask"

    classifier_dropout: float = between(0.1, 0.0, 1.0, high_open=True)
    """Dropout before the classification head, in [0, 1)."""


def new_head(width: int, n_labels: int) -> nn.Linear:
    """A fresh classification layer, initialised like the backbone's (normal, std 0.02; zero bias)."""
    head = nn.Linear(width, n_labels)
    nn.init.normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


class SequenceClassifier(nn.Module):
    """``input_ids`` (B, T) and ``attention_mask`` (B, T) -> label logits (B, K)."""

    def __init__(self, backbone: nn.Module, n_labels: int, dropout: float) -> None:
        super().__init__()
        backbone.drop_pretraining_heads(keep_pooler=True)
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.classifier = new_head(backbone.config.hidden_width, n_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone.token_states(input_ids, attention_mask)  # (B, T, C)
        pooled = self.backbone.pool(hidden, attention_mask)  # (B, C)
        return self.classifier(self.dropout(pooled))  # (B, K)


class ClassificationMetrics(nn.Module):
    """``loss``, ``acc`` and macro ``f1``/``precision``/``recall`` of one split (+ per-label F1)."""

    def __init__(self, labels: list[str], per_label: bool = False) -> None:
        super().__init__()
        k = len(labels)
        self.labels = list(labels)
        common = {"num_classes": k, "ignore_index": IGNORE_INDEX}
        self.metrics = MetricCollection(
            {
                "loss": MeanMetric(),
                "acc": MulticlassAccuracy(average="micro", **common),
                "f1": MulticlassF1Score(average="macro", **common),
                "precision": MulticlassPrecision(average="macro", **common),
                "recall": MulticlassRecall(average="macro", **common),
            },
            compute_groups=False,
        )
        self.per_label = MulticlassF1Score(average="none", **common) if per_label else None

    @torch.no_grad()
    def update(self, preds: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        """Add predictions and labels (any shape, -100 = no label) and the batch's mean loss."""
        n = (labels != IGNORE_INDEX).sum()
        self.metrics["loss"].update(loss, weight=n)
        for name in ("acc", "f1", "precision", "recall"):
            self.metrics[name].update(preds.flatten(), labels.flatten())
        if self.per_label is not None:
            self.per_label.update(preds.flatten(), labels.flatten())

    def compute(self) -> dict[str, torch.Tensor]:
        values = dict(self.metrics.compute())
        if self.per_label is not None:
            per_label = self.per_label.compute()
            values |= {f"f1/{label}": per_label[i] for i, label in enumerate(self.labels)}
        return values

    def reset(self) -> None:
        self.metrics.reset()
        if self.per_label is not None:
            self.per_label.reset()


class SequenceClassificationTask(Task):
    """Fine-tunes ``model`` with a fresh head to predict one label per text.

    Args (beyond :class:`Task`'s):
        labels: the label names, in class-id order (read from the training split by the data module).
    """

    name = "classify"
    data_format = "classify"
    fine_tuning = True
    special_tokens = ("[CLS]", "[SEP]")
    data_hint = "reads labelled examples: add data=jsonl with data.train_path and data.val_path"
    metrics = ("loss", "acc", "f1", "precision", "recall")

    def __init__(self, *args: Any, labels: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.labels = list(labels)
        self.model = self.build_head(self.model, self.config.classifier_dropout)
        self.train_metrics = ClassificationMetrics(self.labels)
        self.val_metrics = ClassificationMetrics(self.labels)
        self.test_metrics = ClassificationMetrics(self.labels, per_label=True)
        self.predictions: list[tuple[int, Any]] | None = None  # set to [] to collect test predictions

    @classmethod
    def build(cls, config: TaskConfig, model: torch.nn.Module, inputs: TaskInputs, **kwargs: Any) -> Task:
        return cls(model, config, labels=list(inputs.labels or []), **kwargs)

    def build_head(self, backbone: nn.Module, dropout: float) -> nn.Module:
        return SequenceClassifier(backbone, len(self.labels), dropout)

    def load_pretrained(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load pre-trained weights (a pre-training or fine-tuning checkpoint's) into the backbone.

        Heads the checkpoint has and this model does not (LM, NSP, an earlier classifier) are skipped;
        every backbone weight must be in the checkpoint, except a pooler (a masked-LM checkpoint has none;
        it starts fresh, as in transformers).
        """
        load_weights_into(self.model.backbone, pretrained_weights(state_dict), ("pooler.",))

    # ----------------------------------------------------------------------------------------- steps
    def _step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        logits = self.model(batch["input_ids"], batch["attention_mask"])  # (B, K) or (B, T, K)
        labels = batch["labels"]
        loss = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        if self.is_padding(batch):
            return loss
        preds = logits.argmax(dim=-1)
        getattr(self, f"{split}_metrics").update(preds.detach(), labels, loss.detach())
        if split == "test" and self.predictions is not None:
            self.collect(batch, preds)
        return loss

    def collect(self, batch: dict[str, torch.Tensor], preds: torch.Tensor) -> None:
        """Keep each example's predicted label id, by its index in the split."""
        for index, pred in zip(batch["index"].tolist(), preds.tolist(), strict=True):
            self.predictions.append((index, pred))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")
