"""Causal language modelling (``task=clm``): predict every next token of packed token blocks.

The model is any causal LM of the registry: ``model(input_ids, labels=labels)`` returns the summed next-token
loss and greedy predictions (a :class:`lmexp.models.head_loss.HeadLoss`) without materialising the logits.
With ``data.document_mask=true`` batches carry ``document_ids`` and the model masks attention at document
boundaries (gpt, llama). Metrics (lmexp/tasks/metrics.py): loss, ppl, acc, bpb, bpw where words mean
something, the corpus's floor when known, and for a mixture of sources each source's own
(``val/<source>/loss``, ``val/<source>/bpb``, ...).
"""

from __future__ import annotations

import warnings
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
        sources: the names of a mixture's sources (``batch["source"]`` indexes them): each gets its own
            validation and test metrics. Empty for one source.
    """

    name = "clm"
    data_format = "blocks"
    metrics = ("loss", "ppl", "acc", "bpw")
    language_model = True

    def __init__(
        self,
        *args: Any,
        vocab_size: int | None = None,
        bpw_floor: float | None = None,
        sources: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.bpw_floor = bpw_floor
        vocab_size = vocab_size or self.model.config.vocab_size
        self.train_metrics = LanguageModelMetrics(vocab_size)
        self.val_metrics = LanguageModelMetrics(vocab_size)
        self.test_metrics = LanguageModelMetrics(vocab_size)
        self.sources = list(sources or [])
        self.source_metrics = torch.nn.ModuleDict(
            {
                split: torch.nn.ModuleList(LanguageModelMetrics(vocab_size) for _ in self.sources)
                for split in ("val", "test")
            }
        )

    @classmethod
    def build(cls, config: TaskConfig, model: torch.nn.Module, inputs: TaskInputs, **kwargs: Any) -> Task:
        vocab_size, floor = inputs.tokenizer.vocab_size, inputs.bpw_floor
        return cls(model, config, vocab_size=vocab_size, bpw_floor=floor, sources=inputs.sources, **kwargs)

    def _nll(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed NLL over the batch's labelled positions, greedy predictions (B*T,), and their count."""
        labels = batch["labels"]  # (B, T), IGNORE_INDEX at padding
        masked = {"document_ids": batch["document_ids"]} if "document_ids" in batch else {}
        nll_sum, predictions = self.model(batch["input_ids"], labels=labels, **masked)
        n_tokens = (labels != IGNORE_INDEX).sum()
        return nll_sum, predictions, n_tokens

    def _update(self, metrics: LanguageModelMetrics, batch: dict[str, Any], nll_sum, predictions) -> None:
        metrics.update(predictions, batch["labels"], nll_sum, batch["n_words"], batch.get("n_bytes"))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        nll_sum, predictions, n_tokens = self._nll(batch)
        self._update(self.train_metrics, batch, nll_sum.detach(), predictions)
        return nll_sum / n_tokens.clamp(min=1)

    def _evaluation_step(self, batch: dict[str, Any], split: str) -> None:
        nll_sum, predictions, _ = self._nll(batch)
        if self.is_padding(batch):
            return
        self._update(getattr(self, f"{split}_metrics"), batch, nll_sum, predictions)
        if self.sources:
            # The evaluation loaders never mix sources in a batch (lmexp.data.sampling.EvaluationBatches).
            source = batch["source_id"]
            self._update(self.source_metrics[split][source], batch, nll_sum, predictions)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def split_values(self, split: str) -> dict[str, torch.Tensor]:
        values = super().split_values(split)
        if split == "train":
            values.pop("tokens", None)
            return values
        if self.bpw_floor is not None and "bpw" in values:
            values["bpw_floor"] = torch.tensor(self.bpw_floor)
        for name, metrics in zip(self.sources, self.source_metrics[split], strict=True):
            with warnings.catch_warnings():  # a source with no batch on this rank is expected
                warnings.filterwarnings("ignore", "The ``compute`` method", UserWarning)
                source_values = metrics.compute()  # every rank computes every source: the sync is collective
            metrics.reset()
            if source_values["tokens"] > 0:  # a source outside trainer.limit_val_batches has no metrics
                values |= {f"{name}/{key}": value for key, value in source_values.items()}
        return values
