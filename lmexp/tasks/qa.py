"""Extractive question answering (``task=qa``): a start and an end logit for every token of a window.

The model is any encoder of the registry with a fresh two-way head on ``token_states`` (Hugging Face's
``BertForQuestionAnswering`` layout: ``qa_outputs`` over the final hidden states, no dropout, no pooler), fed
``[CLS] question [SEP] context [SEP]`` windows (lmexp/data/squad_data.py) with their segment ids when the
backbone takes them. Training minimises the mean of the start and end cross-entropies against the answer's
first and last token (or ``[CLS]`` when the window does not hold the answer), as BERT does.

Validation and test turn the logits of every window of a split into one answer per question
(:func:`lmexp.data.squad.predict_answers`: best start + end pair within ``task.max_answer_len`` tokens,
merged over the windows of a context) and score them with the official SQuAD exact match and F1
(:mod:`lmexp.tasks.squad_metrics`, fractions). The windows of one question may sit on different DDP ranks, so
each window's logits are gathered with its index across ranks (a torchmetrics "cat" state) before the
answers are picked; every rank then computes the same scores.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.utilities import dim_zero_cat

from lmexp.config.schema import positive
from lmexp.tasks.base import Task, TaskConfig, TaskInputs, load_weights_into, pretrained_weights
from lmexp.tasks.classify import new_head

MASKED_LOGIT = -1e4  # padding positions in the loss: never a start or an end (finite, unlike -inf, in bf16)


@dataclass
class QAConfig(TaskConfig):
    """``conf/task/qa.yaml``: answers as spans of the context, scored with SQuAD's exact match and F1."""

    task_class: ClassVar[str] = "lmexp.tasks.qa.QuestionAnsweringTask"

    n_best: int = positive(20)
    """Start and end positions per window paired into candidate spans (and spans kept per question)."""
    max_answer_len: int = positive(30)
    """The most tokens in a predicted answer."""
    null_threshold: float | None = None
    """null: always answer (SQuAD v1.1); a number: answer nothing when the null score beats the best span
    by more than it (SQuAD v2, 0.0 is the usual start)."""


def takes_segments(backbone: nn.Module) -> bool:
    """Whether the backbone's ``token_states`` takes ``token_type_ids`` (bert's segment embeddings).

    The backbone contract only requires ``token_states(input_ids, attention_mask)``; a kind with segment
    embeddings accepts them as an extra keyword, and QA gives them where it can, as BERT was pre-trained
    with ``[CLS] A [SEP] B [SEP]`` segments.
    """
    return "token_type_ids" in inspect.signature(backbone.token_states).parameters


class SpanExtractor(nn.Module):
    """``input_ids``, ``attention_mask``, ``token_type_ids`` (B, T) -> span logits (B, T, 2): start, end."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        backbone.drop_pretraining_heads(keep_pooler=False)
        self.backbone = backbone
        self.classifier = new_head(backbone.config.hidden_width, 2)  # Hugging Face's qa_outputs
        self.segments = takes_segments(backbone)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if self.segments and token_type_ids is not None else {}
        hidden = self.backbone.token_states(input_ids, attention_mask, **extra)  # (B, T, C)
        return self.classifier(hidden)  # (B, T, 2)


class WindowLogits(Metric):
    """The start and end logits of every window seen, with its index in the split, gathered across ranks.

    Windows are kept whole (not padded): a flat "cat" state of logits and one of window lengths.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("lengths", default=[], dist_reduce_fx="cat")
        self.add_state("starts", default=[], dist_reduce_fx="cat")
        self.add_state("ends", default=[], dist_reduce_fx="cat")

    def update(self, index: torch.Tensor, logits: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """``index`` (B,) of the windows, their span ``logits`` (B, T, 2) and ``attention_mask`` (B, T)."""
        real = attention_mask.bool()  # (B, T)
        logits = logits.detach().float()
        self.index.append(index)
        self.lengths.append(real.sum(dim=1))
        self.starts.append(logits[..., 0][real])
        self.ends.append(logits[..., 1][real])

    def compute(self) -> dict[str, Any]:
        """``{"index": [...], "starts": [arrays], "ends": [arrays]}``, one row per distinct window."""
        if isinstance(self.index, list) and not self.index:  # after a DDP sync, states are one tensor each
            return {"index": [], "starts": [], "ends": []}
        index = dim_zero_cat(self.index).tolist()
        lengths = dim_zero_cat(self.lengths).tolist()
        starts = dim_zero_cat(self.starts).cpu().numpy()
        ends = dim_zero_cat(self.ends).cpu().numpy()
        rows: dict[int, tuple[Any, Any]] = {}
        offset = 0
        for window, n in zip(index, lengths, strict=True):
            rows.setdefault(window, (starts[offset : offset + n], ends[offset : offset + n]))
            offset += n
        order = sorted(rows)
        return {
            "index": order,
            "starts": [rows[i][0] for i in order],
            "ends": [rows[i][1] for i in order],
        }


class QAMetrics(nn.Module):
    """One split's loss and, for val and test, every window's logits (answers are picked at epoch end)."""

    def __init__(self, keep_logits: bool) -> None:
        super().__init__()
        self.loss = MeanMetric()
        self.windows = WindowLogits() if keep_logits else None

    @torch.no_grad()
    def update(self, loss: torch.Tensor, batch: dict[str, torch.Tensor], logits: torch.Tensor) -> None:
        self.loss.update(loss, weight=batch["input_ids"].shape[0])
        if self.windows is not None:
            self.windows.update(batch["index"], logits, batch["attention_mask"])

    def compute(self) -> dict[str, torch.Tensor]:
        return {"loss": self.loss.compute()}

    def reset(self) -> None:
        self.loss.reset()
        if self.windows is not None:
            self.windows.reset()


class QuestionAnsweringTask(Task):
    """Fine-tunes an encoder with a fresh span head to answer questions with a piece of the context."""

    name = "qa"
    data_format = "qa"
    fine_tuning = True
    special_tokens = ("[CLS]", "[SEP]")
    data_hint = "reads SQuAD-style questions: add data=squad with data.train_path and data.val_path"
    min_block_size = 8
    metrics = ("loss", "exact_match", "f1")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model = SpanExtractor(self.model)
        self.train_metrics = QAMetrics(keep_logits=False)
        self.val_metrics = QAMetrics(keep_logits=True)
        self.test_metrics = QAMetrics(keep_logits=True)
        self.predictions: dict[str, Any] = {}  # question id -> QAPrediction of the last val/test epoch

    @classmethod
    def build(cls, config: TaskConfig, model: nn.Module, inputs: TaskInputs, **kwargs: Any) -> Task:
        return cls(model, config, **kwargs)

    def load_pretrained(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a pre-trained run's weights into the backbone; its heads are skipped, the span head is new
        (and a pooler, which a masked-LM checkpoint lacks, starts fresh)."""
        load_weights_into(self.model.backbone, pretrained_weights(state_dict), ("pooler.",))

    # ----------------------------------------------------------------------------------------- steps
    def _step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        mask = batch["attention_mask"]
        logits = self.model(batch["input_ids"], mask, batch.get("token_type_ids"))  # (B, T, 2)
        masked = logits.float().masked_fill(~mask.bool()[..., None], MASKED_LOGIT)  # (B, T, 2)
        start_loss = F.cross_entropy(masked[..., 0], batch["start_positions"])
        end_loss = F.cross_entropy(masked[..., 1], batch["end_positions"])
        loss = (start_loss + end_loss) / 2
        if not self.is_padding(batch):
            getattr(self, f"{split}_metrics").update(loss.detach(), batch, logits)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    # --------------------------------------------------------------------------------------- answers
    def split_values(self, split: str) -> dict[str, torch.Tensor]:
        metrics: QAMetrics = getattr(self, f"{split}_metrics")
        values = metrics.compute()
        if metrics.windows is not None:
            values |= self.score_windows(split, metrics.windows.compute())
        metrics.reset()
        return values

    def score_windows(self, split: str, windows: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Exact match and F1 of the answers picked from the windows' logits (questions with a window seen:
        all of them, unless ``trainer.limit_val_batches`` cut the split)."""
        from lmexp.data.squad import predict_answers
        from lmexp.tasks.squad_metrics import squad_scores

        examples, features = self.trainer.datamodule.qa_split(split)
        if not windows["index"]:
            return {}
        seen = [features[i] for i in windows["index"]]
        config = self.config
        self.predictions = predict_answers(
            examples,
            seen,
            windows["starts"],
            windows["ends"],
            n_best=config.n_best,
            max_answer_len=config.max_answer_len,
            null_threshold=config.null_threshold,
        )
        asked = {examples[f.example_index].id: examples[f.example_index].gold_texts for f in seen}
        scores = squad_scores({qid: p.text for qid, p in self.predictions.items()}, asked)
        return {name: torch.tensor(value) for name, value in scores.items()}
