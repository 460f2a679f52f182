"""Masked language modelling (+ next-sentence prediction) as a LightningModule.

Masking happens here, on the batch's device, not in the data loader: each batch's mask is drawn from
a generator seeded by (seed, step, rank), so masking is dynamic (a new mask every time a sequence is
seen) and yet a resumed run, or a second run with the same seed, draws exactly the same masks.
Validation and test sequences are masked the same way at every evaluation and in every process layout
(each seeded by its own tokens), so their losses are comparable across evaluations and across DDP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lmexp.config.schema import between
from lmexp.data.masking import mask_tokens
from lmexp.tasks.base import Task, TaskConfig, TaskInputs
from lmexp.tasks.clm import CausalLMTask
from lmexp.tasks.metrics import IGNORE_INDEX, exact_sum, greedy_predictions

MLM_SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[MASK]")
MIN_BLOCK_SIZE = 8  # [CLS] A [SEP] B [SEP] needs room for a few tokens on each side


@dataclass
class MLMConfig(TaskConfig):
    """``conf/task/mlm.yaml``: masked language modelling with BERT's 80/10/10 masking, and optionally NSP."""

    task_class: ClassVar[str] = "lmexp.tasks.mlm.MaskedLMTask"

    nsp: bool = True
    """Train next-sentence prediction too (half the pairs have a B from another document)."""
    mask_rate: float = between(0.15, 0.0, 1.0, low_open=True, high_open=True)
    """Fraction of the non-special tokens selected per sequence, anew for every batch, in (0, 1)."""
    replace_mask: float = between(0.8, 0.0, 1.0)
    """Of the selected tokens, the fraction replaced by [MASK]."""
    replace_random: float = between(0.1, 0.0, 1.0)
    """Of the selected tokens, the fraction replaced by a random token (the rest stay as they are)."""

    def problems(self) -> list[str]:
        total = self.replace_mask + self.replace_random
        if total > 1 + 1e-9:
            return [
                f"task.replace_mask + task.replace_random = {total:g}: expected at most 1 "
                "(they are fractions of the selected tokens)"
            ]
        return []


class NSPMetrics(torch.nn.Module):
    """Next-sentence prediction: loss, accuracy and macro F1 over the two classes."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics = MetricCollection(
            {
                # As in LanguageModelMetrics: nothing that waits on the device in a training step.
                "nsp_loss_sum": exact_sum(),
                "pairs": exact_sum(),
                "nsp_acc": MulticlassAccuracy(num_classes=2, average="micro", validate_args=False),
                "nsp_f1": MulticlassF1Score(num_classes=2, average="macro", validate_args=False),
            },
            compute_groups=False,
        )

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        self.metrics["nsp_loss_sum"].update(loss * labels.numel())
        self.metrics["pairs"].update(labels.numel())
        preds = logits.argmax(dim=-1)
        self.metrics["nsp_acc"].update(preds, labels)
        self.metrics["nsp_f1"].update(preds, labels)

    def compute(self) -> dict[str, torch.Tensor]:
        values = dict(self.metrics.compute())
        values["nsp_loss"] = values.pop("nsp_loss_sum") / values.pop("pairs").clamp(min=1)
        return values

    def reset(self) -> None:
        self.metrics.reset()


def mlm_loss_sum(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed MLM loss of a masked batch, and what the metrics need.

    The MLM head runs on the masked positions only (BERT's ``mlm_positions``): the same loss as over
    every position with the others ignored, at a fraction of the head's cost. Finding the positions
    reads their number from the device, one host sync per batch on a GPU.

    Args:
        model: a BERT-like model: ``(input_ids, token_type_ids, attention_mask, mlm_positions)`` ->
            ``(mlm_logits (N, V'), nsp_logits (B, 2))``.
        labels: (B, T), the original ids at the masked positions and IGNORE_INDEX elsewhere.

    Returns:
        ``(mlm_sum, n_masked, mlm_logits, labels, nsp_logits)``: the summed cross-entropy, the number
        of masked positions N, their logits (N, V') and labels (N,), and the NSP logits (B, 2).
    """
    flat_labels = labels.flatten()  # (B * T,)
    positions = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)  # (N,)
    mlm_logits, nsp_logits = model(input_ids, token_type_ids, attention_mask, positions)  # (N, V'), (B, 2)
    masked_labels = flat_labels[positions]  # (N,)
    mlm_sum = F.cross_entropy(mlm_logits.float(), masked_labels, reduction="sum")
    n_masked = torch.tensor(positions.numel(), device=labels.device)
    return mlm_sum, n_masked, mlm_logits, masked_labels, nsp_logits


class MaskedLMTask(CausalLMTask):
    """Pre-trains a bidirectional encoder with MLM, and NSP when ``config.nsp`` is on.

    The model maps (input_ids, token_type_ids, attention_mask) to (mlm_logits (B, T, V'), nsp_logits
    (B, 2)). ``val/loss`` is mlm_loss + nsp_loss; ``val/ppl`` and ``val/acc`` cover the masked
    positions only.

    Args (beyond :class:`CausalLMTask`'s):
        special_ids: token ids never masked (specials and padding).
        mask_id: the id of ``[MASK]``.
        seed: seed of the masks.
    """

    name = "mlm"
    data_format = "pairs"
    special_tokens = MLM_SPECIAL_TOKENS
    tokenizer_pieces = {"pad_piece": "[PAD]", "unk_piece": "[UNK]"}  # BERT's spellings
    min_block_size = MIN_BLOCK_SIZE
    metrics = ("loss", "mlm_loss", "ppl", "acc", "nsp_loss", "nsp_acc", "nsp_f1")
    language_model = False

    @classmethod
    def logged_metrics(cls, config: TaskConfig) -> tuple[str, ...]:
        return cls.metrics if config.nsp else tuple(m for m in cls.metrics if not m.startswith("nsp_"))

    def __init__(
        self, *args: Any, special_ids: list[int], mask_id: int, seed: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.nsp = self.config.nsp
        self.special_ids = sorted(set(special_ids))
        self.mask_id = mask_id
        self.mask_seed = seed
        vocab_size = self.train_metrics.vocab_size
        random_ids = torch.tensor([i for i in range(vocab_size) if i not in set(self.special_ids)])
        self.register_buffer("random_ids", random_ids, persistent=False)
        self.register_buffer("special_table", torch.zeros(vocab_size, dtype=torch.bool), persistent=False)
        self.special_table[self.special_ids] = True
        self.train_nsp, self.val_nsp, self.test_nsp = NSPMetrics(), NSPMetrics(), NSPMetrics()

    @classmethod
    def data_options(cls, config: TaskConfig) -> dict[str, Any]:
        return {"nsp": config.nsp}

    def fresh_weights(self) -> tuple[str, ...]:
        # A masked-LM checkpoint (BertForMaskedLM) has neither; the next-sentence head is needed with nsp.
        return ("pooler.",) if self.nsp else ("pooler.", "nsp_head.")

    @classmethod
    def build(cls, config: TaskConfig, model: torch.nn.Module, inputs: TaskInputs, **kwargs: Any) -> Task:
        tokenizer = inputs.tokenizer
        specials = [tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id]
        specials += [tokenizer.special_id(token) for token in cls.special_tokens]
        return cls(
            model,
            config,
            vocab_size=tokenizer.vocab_size,
            special_ids=specials,
            mask_id=tokenizer.special_id("[MASK]"),
            seed=inputs.seed,
            **kwargs,
        )

    # ------------------------------------------------------------------------------------- masking
    def _masked(
        self, batch: dict[str, torch.Tensor], stream: int, index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = batch["input_ids"]  # (B, T)
        special = self.special_table[input_ids] | (batch["attention_mask"] == 0)  # (B, T) never masked
        if stream < 0:
            return self._masked_by_content(input_ids, special, stream)
        generator = torch.Generator(device=input_ids.device)
        generator.manual_seed(hash((self.mask_seed, stream, index, self.global_rank)) % (2**63))
        return mask_tokens(input_ids, special, self.config, self.mask_id, self.random_ids, generator)

    def _masked_by_content(
        self, input_ids: torch.Tensor, special: torch.Tensor, stream: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation masks: each sequence's mask is seeded by its own tokens, so a val/test example is
        masked the same way whatever batch, rank or number of processes it lands in (DDP and a single
        process then score the same masked val set). One host read per evaluation batch."""
        masked, labels = [], []
        for row, row_special in zip(input_ids, special, strict=True):
            generator = torch.Generator(device=input_ids.device)
            generator.manual_seed(hash((self.mask_seed, stream, tuple(row.tolist()))) % (2**63))
            ids, row_labels = mask_tokens(
                row[None], row_special[None], self.config, self.mask_id, self.random_ids, generator
            )
            masked.append(ids)
            labels.append(row_labels)
        return torch.cat(masked), torch.cat(labels)  # (B, T), (B, T)

    # --------------------------------------------------------------------------------------- steps
    def _losses(self, batch: dict[str, torch.Tensor], stream: int, index: int, split: str) -> torch.Tensor:
        input_ids, labels = self._masked(batch, stream, index)
        mlm_sum, n_masked, mlm_logits, labels, nsp_logits = mlm_loss_sum(
            self.model, input_ids, batch["token_type_ids"], batch["attention_mask"], labels
        )
        loss = mlm_sum / n_masked.clamp(min=1)
        no_words = torch.zeros(1, dtype=torch.long, device=input_ids.device)
        count = not self.is_padding(batch)
        mlm_metrics = getattr(self, f"{split}_metrics")
        predictions = greedy_predictions(mlm_logits.detach(), mlm_metrics.vocab_size)  # (N,)
        if count:
            mlm_metrics.update(predictions, labels, mlm_sum.detach(), no_words)
        if self.nsp:
            nsp_loss = F.cross_entropy(nsp_logits.float(), batch["nsp_label"])
            if count:
                nsp_metrics = getattr(self, f"{split}_nsp")
                nsp_metrics.update(nsp_logits.detach(), batch["nsp_label"], nsp_loss.detach())
            loss = loss + nsp_loss
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # One mask per micro-batch: seeded by the optimizer step and the batch's place in the epoch.
        return self._losses(batch, self.global_step, batch_idx, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._losses(batch, -1, batch_idx, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._losses(batch, -2, batch_idx, "test")

    def split_values(self, split: str) -> dict[str, torch.Tensor]:
        mlm = super().split_values(split)
        values = {"mlm_loss": mlm["loss"], "ppl": mlm["ppl"], "acc": mlm["acc"], "loss": mlm["loss"]}
        if self.nsp:
            nsp_metrics = getattr(self, f"{split}_nsp")
            values |= nsp_metrics.compute()
            nsp_metrics.reset()
            values["loss"] = values["mlm_loss"] + values["nsp_loss"]
        return values
