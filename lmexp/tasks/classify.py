"""Sequence classification as a LightningModule: a pre-trained (or fresh) model plus a classification head.

The sentence vector is the pooled ``[CLS]`` for BERT (its pre-trained pooler, as in Hugging Face's
``BertForSequenceClassification``), the last non-pad token's final hidden state for GPT, and the last
non-pad LSTM output for the LSTM. Metrics (torchmetrics, synced across ranks): ``loss``, ``acc``, and
macro ``f1``, ``precision``, ``recall``; on the test split also the F1 of every label, ``f1/<label>``.
"""

from __future__ import annotations

from typing import Any

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

from lmexp.metrics import IGNORE_INDEX
from lmexp.models.bert import BERT
from lmexp.models.gpt import GPT
from lmexp.models.lstm import LSTMLM
from lmexp.tasks.language_model import CausalLMTask

FINE_TUNING_MODELS = ("GPTConfig", "BERTConfig", "LSTMConfig")  # config classes a fine-tuning task accepts


def hidden_width(backbone: nn.Module) -> int:
    """Width of the hidden states the heads read."""
    config = backbone.config
    return config.hidden_size if isinstance(backbone, LSTMLM) else config.n_embd


def token_states(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states (B, T, C) of any backbone; padding (on the right) never reaches real positions."""
    if isinstance(backbone, BERT):
        return backbone.encode(input_ids, None, attention_mask)  # (B, T, C)
    if isinstance(backbone, GPT):
        return backbone.hidden_states(input_ids)  # (B, T, C): causal, so right padding is never seen
    hidden, _ = backbone.hidden_states(input_ids)  # (B, T, H)
    return hidden


def drop_unused_heads(backbone: nn.Module, keep_pooler: bool) -> None:
    """Remove the pre-training heads a fine-tuned model never calls.

    Parameters without gradients would stop DDP (unused parameters), and the Hugging Face classes a
    fine-tuned BERT exports to have no such heads. Tied matrices stay: they are the embedding.
    """
    if isinstance(backbone, BERT):
        backbone.mlm_head = None
        backbone.nsp_head = None
        if not keep_pooler:
            backbone.pooler = None
    elif isinstance(backbone, LSTMLM):
        backbone.proj = None
        backbone.lm_head = None
    elif isinstance(backbone, GPT) and not backbone.config.tie_embeddings:
        backbone.lm_head = None


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
        drop_unused_heads(backbone, keep_pooler=True)
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.classifier = new_head(hidden_width(backbone), n_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = token_states(self.backbone, input_ids, attention_mask)  # (B, T, C)
        if isinstance(self.backbone, BERT):
            pooled = self.backbone.pool(hidden)  # (B, C): dense + tanh over [CLS]
        else:
            last = attention_mask.sum(dim=1) - 1  # (B,) index of the last real token
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, C)
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


class SequenceClassificationTask(CausalLMTask):
    """Fine-tunes ``model`` with a fresh head to predict one label per text.

    Args (beyond :class:`CausalLMTask`'s):
        labels: the label names, in class-id order (read from the training split by the data module).
        classifier_dropout: dropout before the head.
    """

    task_name = "classify"
    data_format = "classify"
    special_tokens = ("[CLS]", "[SEP]")
    supported_models = FINE_TUNING_MODELS

    def __init__(self, *args: Any, labels: list[str], classifier_dropout: float = 0.1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.labels = list(labels)
        self.model = self.build_head(self.model, classifier_dropout)
        self.train_metrics = ClassificationMetrics(self.labels)
        self.val_metrics = ClassificationMetrics(self.labels)
        self.test_metrics = ClassificationMetrics(self.labels, per_label=True)
        self.predictions: list[tuple[int, Any]] | None = None  # set to [] to collect test predictions

    def build_head(self, backbone: nn.Module, dropout: float) -> nn.Module:
        return SequenceClassifier(backbone, len(self.labels), dropout)

    @classmethod
    def check_settings(cls, cfg: Any) -> list[str]:
        dropout = cfg.task.get("classifier_dropout", 0.1)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            return [f"task.classifier_dropout={dropout!r}: expected a number in [0, 1)"]
        return []

    @classmethod
    def data_kwargs(cls, datamodule: Any) -> dict[str, Any]:
        """Constructor arguments that come from the data: the label set."""
        return {"labels": list(datamodule.labels)}

    def load_backbone(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load pre-trained weights (a pre-training or fine-tuning checkpoint's) into the backbone.

        Heads the checkpoint has and this model does not (LM, NSP, an earlier classifier) are skipped;
        every backbone weight must be in the checkpoint.
        """
        weights = {}
        for key, value in state_dict.items():
            name = key.removeprefix("model.").removeprefix("_orig_mod.")
            weights[name.removeprefix("backbone.")] = value
        backbone = self.model.backbone
        own = backbone.state_dict()
        missing = sorted(set(own) - set(weights))
        if missing:
            from lmexp.errors import CheckpointError

            raise CheckpointError(f"init_from: the checkpoint lacks backbone weights {missing[:3]}")
        backbone.load_state_dict({k: weights[k] for k in own})

    # ----------------------------------------------------------------------------------------- steps
    def _step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        logits = self.model(batch["input_ids"], batch["attention_mask"])  # (B, K) or (B, T, K)
        labels = batch["labels"]
        loss = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
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
