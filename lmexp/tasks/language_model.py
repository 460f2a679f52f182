"""Causal language modelling as a LightningModule: next-token loss, metrics and optimizer groups.

The model is any ``nn.Module`` that, called as ``model(input_ids, labels=labels)``, returns the summed
next-token loss and greedy predictions (a :class:`lmexp.models.head_loss.HeadLoss`); this module owns the
objective, the metrics (lmexp/metrics.py) and the optimizer, and nothing about data or logging.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lmexp.metrics import IGNORE_INDEX, LanguageModelMetrics
from lmexp.models.layers import decay_parameter_groups

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class CausalLMTask(LightningModule):
    """Trains ``model`` to predict every next token of packed token blocks.

    Args:
        model: plain ``nn.Module``; ``model(input_ids, labels=labels)`` -> ``(nll_sum, predictions)``.
        optimizer: a partial optimizer (``optim/`` config) called with the parameter groups.
        scheduler: a partial LR scheduler (``scheduler/`` config) stepped once per optimizer step.
        vocab_size: the tokenizer's vocabulary size (V' may be padded above it).
        compile: compile the model with ``torch.compile`` when the trainer sets it up.
        bpw_floor: the corpus's entropy in bits per word, logged next to ``val/bpw`` when known.
    """

    task_name = "clm"  # matched against the model config's supported_tasks
    data_format = "blocks"  # what the data module feeds it: packed token blocks
    special_tokens: tuple[str, ...] = ()  # tokens the tokenizer must reserve for this task
    tokenizer_pieces: dict[str, str] = {}  # spellings of the tokenizer's pad/unk pieces, if not the default

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        vocab_size: int | None = None,
        compile: bool = False,
        bpw_floor: float | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.compile_model = compile
        self.bpw_floor = bpw_floor
        vocab_size = vocab_size or model.config.vocab_size
        self.train_metrics = LanguageModelMetrics(vocab_size)
        self.val_metrics = LanguageModelMetrics(vocab_size)
        self.test_metrics = LanguageModelMetrics(vocab_size)
        # Saved into every checkpoint (resolved config, tokenizer, logger ids): lets eval, generate,
        # export and resume rebuild the run from the checkpoint alone.
        self.checkpoint_extras: dict[str, Any] = {}
        self.flops_per_batch: float | None = None  # read by ThroughputMonitor; MFU needs it

    @classmethod
    def check_settings(cls, cfg: Any) -> list[str]:
        """Problems with this task's settings in the composed config (none for causal LM)."""
        return []

    @classmethod
    def builder_kwargs(cls, tokenizer: Any, cfg: Any) -> dict[str, Any]:
        """Constructor arguments that come from the tokenizer or the run, not from ``task/``."""
        return {}

    # ----------------------------------------------------------------------------------------- steps
    def _nll(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed NLL over the batch's labelled positions, greedy predictions (B*T,), and their count."""
        labels = batch["labels"]  # (B, T), IGNORE_INDEX at padding
        # The model computes the loss from its hidden states (lmexp/models/head_loss.py), without logits.
        nll_sum, predictions = self.model(batch["input_ids"], labels=labels)
        n_tokens = (labels != IGNORE_INDEX).sum()
        return nll_sum, predictions, n_tokens

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        nll_sum, predictions, n_tokens = self._nll(batch)
        self.train_metrics.update(predictions, batch["labels"], nll_sum.detach(), batch["n_words"])
        return nll_sum / n_tokens.clamp(min=1)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # Train metrics are averaged over each logging window and computed only then, so the step
        # itself never waits on a host sync. Logged here rather than at batch end: ModelCheckpoint saves
        # in on_train_batch_end, and a checkpoint keeps the step's row only if it is complete by then.
        trainer = self.trainer
        if trainer.fit_loop._should_accumulate() or not trainer._logger_connector.should_update_logs:
            return
        self._log_values("train", self._split_values("train"))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        nll_sum, predictions, _ = self._nll(batch)
        self.val_metrics.update(predictions, batch["labels"], nll_sum, batch["n_words"])

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        nll_sum, predictions, _ = self._nll(batch)
        self.test_metrics.update(predictions, batch["labels"], nll_sum, batch["n_words"])

    def on_validation_epoch_end(self) -> None:
        self._log_split("val")

    def on_test_epoch_end(self) -> None:
        self._log_split("test")

    def _log_split(self, split: str) -> None:
        self._log_values(split, self._split_values(split))

    def _split_values(self, split: str) -> dict[str, torch.Tensor]:
        """The split's metrics since the last call (synced across ranks by torchmetrics), then reset."""
        metrics = getattr(self, f"{split}_metrics")
        values = metrics.compute()
        metrics.reset()
        if self.bpw_floor is not None and "bpw" in values and split != "train":
            values["bpw_floor"] = torch.tensor(self.bpw_floor)
        return values

    def _log_values(self, split: str, values: dict[str, torch.Tensor]) -> None:
        values = dict(values)
        self.log(f"{split}/loss", values.pop("loss"), prog_bar=split in ("train", "val"))
        self.log_dict({f"{split}/{k}": v for k, v in values.items()})

    # ------------------------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        keywords = getattr(self.optimizer_factory, "keywords", {})
        groups = decay_parameter_groups(self.model, keywords.get("weight_decay", 0.0))
        optimizer = self.optimizer_factory(
            groups, **fused_kernel_option(self.optimizer_factory, groups, self._under_autocast())
        )
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _under_autocast(self) -> bool:
        from lightning.pytorch.plugins.precision import MixedPrecision

        return self._trainer is not None and isinstance(self.trainer.precision_plugin, MixedPrecision)

    def configure_model(self) -> None:
        # FSDP2 sharding per transformer block (under trainer=fsdp), activation checkpointing, and
        # in-place compilation, all keeping parameter names (so checkpoints) as they are.
        from lmexp.strategies import configure_model

        configure_model(self)

    # ---------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lmexp"] = dict(self.checkpoint_extras)
        # Random states, so that a resumed run draws the same dropout masks as one never stopped.
        checkpoint["lmexp"]["rng"] = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state_to_plain(np.random.get_state()),
            "python": random.getstate(),
        }
        checkpoint["lmexp"]["train_window"] = self._train_window_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extras = checkpoint.get("lmexp", {})
        rng = extras.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            np.random.set_state(_numpy_state_from_plain(rng["numpy"]))
            random.setstate(rng["python"])
        if extras.get("train_window"):
            self._restore_train_window(extras["train_window"])

    def _train_metric_parts(self) -> list[tuple[str, Metric]]:
        return [(name, m) for name, m in self.train_metrics.named_modules() if isinstance(m, Metric)]

    def _train_window_state(self) -> dict[str, torch.Tensor]:
        """The train metrics' state since their last log, summed over ranks.

        Train metrics are logged per window of ``log_every_n_steps`` steps; a checkpoint taken inside a
        window keeps what the window holds so far, so the resumed run's first train row covers the same
        steps as in a run never stopped. Every rank saves (Lightning calls this hook on all of them).
        """
        state = {}
        for name, metric in self._train_metric_parts():
            with metric.sync_context():  # a collective under DDP; nothing on one process
                for key, value in metric.metric_state.items():
                    if isinstance(value, list):  # "cat" states: one tensor, or nothing to keep yet
                        value = dim_zero_cat(value) if value else None
                    if value is not None:
                        state[f"{name}.{key}"] = value.detach().to("cpu", copy=True)
        return state

    def _restore_train_window(self, state: dict[str, torch.Tensor]) -> None:
        if self.global_rank != 0:
            return  # the saved state is the sum over all ranks: one rank holds it, the others start empty
        for name, metric in self._train_metric_parts():
            for key, current in metric.metric_state.items():
                saved = state.get(f"{name}.{key}")
                if saved is None:
                    continue
                if isinstance(current, list):
                    setattr(metric, key, [saved.to(metric.device)])
                else:
                    setattr(metric, key, saved.to(current.device, current.dtype))


# Optimizers with a fused single-kernel step in torch, on these device types.
_FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)
_FUSED_DEVICES = ("cpu", "cuda")


def fused_kernel_option(
    factory: OptimizerFactory, groups: list[dict], autocast: bool = False
) -> dict[str, bool]:
    """``{"fused": True}`` when the optimizer config leaves the choice open and torch has a fused step here.

    AdamW's default on CPU updates one tensor at a time; the fused kernel does the whole step in one pass
    and is several times faster (bench/RESULTS.md). An explicit ``optim.fused`` or ``optim.foreach`` wins.
    Kept off for FSDP2's sharded parameters (DTensors) and under Lightning's mixed precision (``autocast``),
    which refuses to clip gradients for an optimizer that unscales them itself, as fused ones do; torch's
    default then applies (the multi-tensor step on GPUs).
    """
    keywords = getattr(factory, "keywords", {})
    if autocast or getattr(factory, "func", None) not in _FUSED_OPTIMIZERS:
        return {}
    if keywords.get("fused") is not None or keywords.get("foreach") is not None:
        return {}
    params = [p for group in groups for p in group["params"]]
    plain = all(type(p.data) is torch.Tensor and p.device.type in _FUSED_DEVICES for p in params)
    return {"fused": True} if params and plain else {}


def _numpy_state_to_plain(state: tuple) -> list:
    """numpy's RNG state as plain lists, so checkpoints load with ``torch.load(weights_only=True)``."""
    name, keys, position, has_gauss, cached_gaussian = state
    return [name, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)]


def _numpy_state_from_plain(state: list) -> tuple:
    name, keys, position, has_gauss, cached_gaussian = state
    return (name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian)
