"""Language-model metrics, accumulated with torchmetrics so that they sync across DDP ranks.

Per split: ``loss`` (mean NLL per predicted token, nats, token-weighted across batches and ranks),
``ppl`` (exp of that loss), ``acc`` (next-token accuracy over the real vocabulary), ``bpb`` (bits per
byte: the summed NLL in bits divided by the UTF-8 bytes of the original text of the documents predicted)
and ``bpw`` (bits per word: the same over their whitespace-separated words). ``bpb`` is comparable across
tokenizers and languages. ``bpw`` is reported only where a whitespace-separated word is a word
(:func:`words_are_meaningful`): in Chinese or Japanese text, which has no spaces, a "word" is a whole line.
The NLL is the model's own over its padded vocabulary, exactly what training minimises.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric, MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from lmexp.models.head_loss import IGNORE_INDEX  # re-exported: the tasks import it from here

# Space-separated languages average about 4 to 10 UTF-8 bytes per whitespace-separated word, space included
# (English ~6, German ~7, Korean ~10); text without spaces has dozens. Above this bpw is not reported.
MAX_BYTES_PER_WORD = 16.0


def words_are_meaningful(n_bytes: float, n_words: float) -> bool:
    """Whether bits per word mean something for text of ``n_bytes`` UTF-8 bytes in ``n_words``
    whitespace-separated words: it has words, of at most :data:`MAX_BYTES_PER_WORD` bytes on average
    (with no byte count, ``n_bytes`` 0, words alone decide)."""
    return n_words > 0 and (n_bytes <= 0 or n_bytes / n_words <= MAX_BYTES_PER_WORD)


def exact_sum() -> SumMetric:
    """A float64 running sum that never scans its input for NaN (no host sync on a GPU)."""
    return SumMetric(nan_strategy="disable").set_dtype(torch.float64)


def greedy_predictions(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Argmax over the real vocabulary of ``logits`` (..., V'); padded rows are never targets."""
    return logits[..., :vocab_size].argmax(dim=-1)


class LanguageModelMetrics(torch.nn.Module):
    """Metrics of one split, updated from predictions, labels, the summed NLL and the batch's word and byte
    counts."""

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
            "bytes": exact_sum(),
        }
        self.metrics = MetricCollection(metrics, compute_groups=False)
        self.vocab_size = vocab_size

    @torch.no_grad()
    def update(
        self,
        predictions: torch.Tensor,
        labels: torch.Tensor,
        nll_sum: torch.Tensor,
        n_words: torch.Tensor,
        n_bytes: torch.Tensor | None = None,
    ) -> None:
        """Add a batch: predicted ids and ``labels`` (same number of elements), its summed NLL, and the
        words and UTF-8 bytes of the text its labels predict.

        Predictions come from the real vocabulary only (see :func:`greedy_predictions`).
        """
        self.metrics["acc"].update(predictions.flatten(), labels.flatten())
        self.metrics["nll_sum"].update(nll_sum)
        self.metrics["tokens"].update((labels != IGNORE_INDEX).sum())
        self.metrics["words"].update(n_words.sum())
        # No bytes (masked LM): a zero still counts as an update, so computing the sum raises no warning.
        self.metrics["bytes"].update(n_bytes.sum() if n_bytes is not None else nll_sum.new_zeros(()))

    def compute(self) -> dict[str, torch.Tensor]:
        """The split's metrics, plus ``tokens`` (predicted tokens, all ranks); ``bpb`` when bytes were
        counted, ``bpw`` when words mean something."""
        values = self.metrics.compute()
        loss = values["nll_sum"] / values["tokens"].clamp(min=1)  # token-weighted mean NLL, all ranks
        out = {"loss": loss, "acc": values["acc"], "ppl": torch.exp(loss), "tokens": values["tokens"]}
        bits = values["nll_sum"] / math.log(2)
        n_bytes, n_words = float(values["bytes"]), float(values["words"])
        if n_bytes > 0:
            out["bpb"] = bits / values["bytes"]
        if words_are_meaningful(n_bytes, n_words):
            out["bpw"] = bits / values["words"]
        return out

    def reset(self) -> None:
        self.metrics.reset()
