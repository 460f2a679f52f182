"""Causal language modelling (``task=clm``): predict every next token of packed token blocks.

The model is any causal LM of the registry: ``model(input_ids, labels=labels)`` returns the summed next-token
loss and greedy predictions (a :class:`lmexp.models.head_loss.HeadLoss`) without materialising the logits.
Metrics (lmexp/tasks/metrics.py): loss, ppl, acc, bpw (and the corpus's floor when known).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lmexp.tasks.base import Task, TaskConfig, TaskInputs
from lmexp.tasks.metrics import IGNORE_INDEX, LanguageModelMetrics


@dataclass
class CLMConfig(TaskConfig):
    """``conf/task/clm.yaml``: causal language modelling has no settings of its own."""

    task_class: ClassVar[str] = "lmexp.tasks.clm.CausalLMTask"


class CausalLMTask(Task):
    """Trains ``model`` to predict every next token.

    Args (beyond :class:`Task`'s):
        vocab_size: the tokenizer's vocabulary size (the model's may be padded above it).
        bpw_floor: the corpus's entropy in bits per word, logged next to ``val/bpw`` when known.
    """

    name = "clm"
    data_format = "blocks"
    metrics = ("loss", "ppl", "acc", "bpw")
    language_model = True

    def __init__(
        self, *args: Any, vocab_size: int | None = None, bpw_floor: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.bpw_floor = bpw_floor
        vocab_size = vocab_size or self.model.config.vocab_size
        self.train_metrics = LanguageModelMetrics(vocab_size)
        self.val_metrics = LanguageModelMetrics(vocab_size)
        self.test_metrics = LanguageModelMetrics(vocab_size)

    @classmethod
    def build(cls, config: TaskConfig, model: torch.nn.Module, inputs: TaskInputs, **kwargs: Any) -> Task:
        vocab_size, floor = inputs.tokenizer.vocab_size, inputs.bpw_floor
        return cls(model, config, vocab_size=vocab_size, bpw_floor=floor, **kwargs)

    def _nll(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed NLL over the batch's labelled positions, greedy predictions (B*T,), and their count."""
        labels = batch["labels"]  # (B, T), IGNORE_INDEX at padding
        nll_sum, predictions = self.model(batch["input_ids"], labels=labels)
        n_tokens = (labels != IGNORE_INDEX).sum()
        return nll_sum, predictions, n_tokens

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        nll_sum, predictions, n_tokens = self._nll(batch)
        self.train_metrics.update(predictions, batch["labels"], nll_sum.detach(), batch["n_words"])
        return nll_sum / n_tokens.clamp(min=1)

    def _evaluation_step(self, batch: dict[str, torch.Tensor], split: str) -> None:
        nll_sum, predictions, _ = self._nll(batch)
        if not self.is_padding(batch):
            getattr(self, f"{split}_metrics").update(predictions, batch["labels"], nll_sum, batch["n_words"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def split_values(self, split: str) -> dict[str, torch.Tensor]:
        values = super().split_values(split)
        if self.bpw_floor is not None and "bpw" in values and split != "train":
            values["bpw_floor"] = torch.tensor(self.bpw_floor)
        return values
