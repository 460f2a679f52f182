"""Language-model metrics, accumulated with torchmetrics so that they sync across DDP ranks.

Per split: ``loss`` (mean NLL per predicted token, nats, token-weighted across batches and ranks),
``ppl`` (exp of that loss), ``acc`` (next-token accuracy over the real vocabulary) and ``bpw`` (bits
per word: summed NLL in bits over the split divided by the number of whitespace-separated words
predicted). The NLL is the model's own over its padded vocabulary, exactly what training minimises.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric, MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from lmexp.models.head_loss import IGNORE_INDEX  # re-exported: the tasks import it from here


def exact_sum() -> SumMetric:
    """A float64 running sum that never scans its input for NaN (no host sync on a GPU)."""
    return SumMetric(nan_strategy="disable").set_dtype(torch.float64)


def greedy_predictions(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Argmax over the real vocabulary of ``logits`` (..., V'); padded rows are never targets."""
    return logits[..., :vocab_size].argmax(dim=-1)


class LanguageModelMetrics(torch.nn.Module):
    """Metrics of one split, updated from predictions, labels, the summed NLL and the batch's word count."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        # Updated on every training step, so nothing here may wait on the device: sums without torchmetrics'
        # NaN scan (a NaN loss should show, not be dropped) and accuracy without its argument checks.
        # The sums are float64, so the result does not depend on how batches are split across ranks and
        # token counts stay exact past float32's 2**24.
        metrics: dict[str, Metric] = {
            "acc": MulticlassAccuracy(
                num_classes=vocab_size, average="micro", ignore_index=IGNORE_INDEX, validate_args=False
            ),
            "nll_sum": exact_sum(),
            "tokens": exact_sum(),
            "words": exact_sum(),
        }
        self.metrics = MetricCollection(metrics, compute_groups=False)
        self.vocab_size = vocab_size

    @torch.no_grad()
    def update(
        self, predictions: torch.Tensor, labels: torch.Tensor, nll_sum: torch.Tensor, n_words: torch.Tensor
    ):
        """Add a batch: predicted ids and ``labels`` (same number of elements), its summed NLL and word count.

        Predictions come from the real vocabulary only (see :func:`greedy_predictions`).
        """
        self.metrics["acc"].update(predictions.flatten(), labels.flatten())
        self.metrics["nll_sum"].update(nll_sum)
        self.metrics["tokens"].update((labels != IGNORE_INDEX).sum())
        self.metrics["words"].update(n_words.sum())

    def compute(self) -> dict[str, torch.Tensor]:
        """The split's metrics; ``bpw`` only when words were counted."""
        values = self.metrics.compute()
        loss = values["nll_sum"] / values["tokens"].clamp(min=1)  # token-weighted mean NLL, all ranks
        out = {"loss": loss, "acc": values["acc"], "ppl": torch.exp(loss)}
        if values["words"] > 0:
            out["bpw"] = values["nll_sum"] / math.log(2) / values["words"]
        return out

    def reset(self) -> None:
        self.metrics.reset()
