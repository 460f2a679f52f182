"""Instruction (prompt -> completion) fine-tuning of a causal language model (``task=sft``).

The model is the pre-trained causal LM itself (gpt, llama: no new head), fed packed blocks
(lmexp/data/sft_data.py) whose targets are -100 everywhere except the completion tokens and each example's
closing eos, so the loss covers what the model should write and nothing of the prompt. ``document_ids`` keep
the examples of a block apart (block-diagonal causal attention, positions restarting at each example), so an
example's logits are those it gets alone. Metrics: ``loss`` (mean NLL per completion token), ``ppl`` and
``acc`` (greedy next-token accuracy over completion tokens). Generation metrics (exact match, ROUGE-L, chrF,
BLEU) come from ``python -m lmexp.eval`` on the test split, which decodes every completion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lmexp.tasks.base import TaskConfig
from lmexp.tasks.clm import CausalLMTask
from lmexp.tasks.metrics import IGNORE_INDEX


@dataclass
class SFTConfig(TaskConfig):
    """``conf/task/sft.yaml``: prompt -> completion fine-tuning has no settings of its own (the data's are
    ``data.*``, decoding's are lmexp.eval's ``generation.*``)."""

    task_class: ClassVar[str] = "lmexp.tasks.sft.SFTTask"


class SFTTask(CausalLMTask):
    """Fine-tunes a causal LM on the completion tokens of packed prompt/completion examples."""

    name = "sft"
    data_format = "sft"
    fine_tuning = True
    data_hint = "reads prompt/completion rows: add data=sft with data.train_path and data.val_path"
    min_block_size = 2
    metrics = ("loss", "ppl", "acc")
    language_model = True

    def _nll(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed NLL over the completion targets, greedy predictions (B*T,), and the number of targets."""
        labels = batch["labels"]  # (B, T): next-token targets, -100 on prompts, padding, example ends
        nll_sum, predictions = self.model(
            batch["input_ids"], labels=labels, document_ids=batch["document_ids"]
        )
        return nll_sum, predictions, (labels != IGNORE_INDEX).sum()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        nll_sum, predictions, n_targets = self._nll(batch)
        self.train_metrics.update(predictions, batch["labels"], nll_sum.detach(), _no_words(batch))
        return nll_sum / n_targets.clamp(min=1)

    def _evaluation_step(self, batch: dict[str, torch.Tensor], split: str) -> None:
        nll_sum, predictions, _ = self._nll(batch)
        if not self.is_padding(batch):
            metrics = getattr(self, f"{split}_metrics")
            metrics.update(predictions, batch["labels"], nll_sum, _no_words(batch))


def _no_words(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Completions are no corpus: no word count, so no bits per word."""
    return torch.zeros((), dtype=torch.long, device=batch["input_ids"].device)
