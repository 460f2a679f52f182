"""What every task shares: the LightningModule base, its config base, and the task contract.

A task is one LightningModule (``conf/task/<name>.yaml`` names its config dataclass, which names the module).
:class:`Task` owns what does not depend on the objective: the optimizer and its parameter groups, the
learning-rate schedule, FSDP sharding and compilation of the model, the random state and the unfinished
logging window kept in checkpoints, and the logging of each split's metrics. A subclass adds its objective:
the steps, its metrics, and the class attributes of the contract below.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lmexp.config.schema import Schema
from lmexp.training.distributed import PADDING_KEY

SPLITS = ("train", "val", "test")


class TaskConfig(Schema):
    """Base of the task config dataclasses (``conf/task/*.yaml``)."""

    group: ClassVar[str] = "task"
    task_class: ClassVar[str]
    """Import path of the task's LightningModule."""

    @classmethod
    def task_type(cls) -> type[Task]:
        """The task's LightningModule class."""
        import importlib

        module, _, name = cls.task_class.rpartition(".")
        return getattr(importlib.import_module(module), name)


@dataclass
class TaskInputs:
    """What a task takes from outside its config: the tokenizer, and from the data or a checkpoint."""

    tokenizer: Any
    """The run's tokenizer (special ids, vocabulary size)."""
    labels: list[str] | None = None
    """Fine-tuning: the label set, in class-id order."""
    bpw_floor: float | None = None
    """The corpus's entropy in bits per word, when known (the built-in corpus)."""
    seed: int = 0
    """The run's seed (masked LM draws its masks from it)."""
    sources: list[str] = field(default_factory=list)
    """The names of a mixture's sources (per-source metrics ``val/<source>/...``); empty for one source."""


class Task(LightningModule):
    """Base LightningModule of every task.

    Args:
        model: the plain ``nn.Module`` (see lmexp/models/registry.py for what it offers).
        config: the task's config dataclass.
        optimizer: the optimizer settings (None when restored for inference).
        scheduler: the learning-rate schedule (None: constant).
        compile: compile the model with ``torch.compile`` when the trainer sets it up.
    """

    # ------------------------------------------------------------------ the task contract (class attributes)
    name: ClassVar[str]
    """The task's name (``task=<name>``), matched against a model kind's tasks."""
    data_format: ClassVar[str]
    """What the data module must feed it: ``blocks`` (packed tokens), ``pairs`` ([CLS] A [SEP] B [SEP]),
    ``classify`` or ``ner`` (labelled examples)."""
    fine_tuning: ClassVar[bool] = False
    """Reads labelled data, may start from a pre-trained run (``init_from``) with a fresh head."""
    special_tokens: ClassVar[tuple[str, ...]] = ()
    """Tokens the tokenizer must reserve for this task (``[CLS]``, ``[SEP]``, ``[MASK]``)."""
    tokenizer_pieces: ClassVar[dict[str, str]] = {}
    """Spellings of the tokenizer's pad/unk pieces, when not the default (BERT's ``[PAD]``/``[UNK]``)."""
    data_hint: ClassVar[str] = "reads plain text: use data=builtin or data=text"
    """What to tell a user whose ``data`` does not give this task's examples (after ``task=<name>``)."""
    min_block_size: ClassVar[int] = 1
    """The shortest ``data.block_size`` the task can use."""
    metrics: ClassVar[tuple[str, ...]] = ("loss",)
    """The metrics it logs for the val and test splits (``val/<name>``): what early stopping and the best
    checkpoint can monitor (lmexp/config/checks.py). Train rows have ``train/loss`` at least."""
    language_model: ClassVar[bool] = False
    """Its model is a whole causal LM (next-token logits, ``start_generation``), so generation and
    lm-evaluation-harness can run on it."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: TaskConfig,
        optimizer: Any = None,
        scheduler: Any = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.optimizer_config = optimizer
        self.scheduler_config = scheduler
        self.compile_model = compile
        # Saved into every checkpoint (resolved config, tokenizer, logger ids): lets eval, generate, export
        # and resume rebuild the run from the checkpoint alone.
        self.checkpoint_extras: dict[str, Any] = {}
        self.flops_per_batch: float | None = None  # read by the throughput callback; MFU needs it
        # Set by the builder: model/params and model/trainable_params, counted before any sharding.
        self.parameter_counts: dict[str, int] = {}
        self.adapters_only = False  # LoRA: checkpoints keep only what trains (Task.apply_lora)
        self.train_metrics: torch.nn.Module
        self.val_metrics: torch.nn.Module
        self.test_metrics: torch.nn.Module

    @classmethod
    def build(cls, config: TaskConfig, model: torch.nn.Module, inputs: TaskInputs, **kwargs: Any) -> Task:
        """The task around ``model``; ``kwargs`` are :class:`Task`'s (optimizer, scheduler, compile)."""
        return cls(model, config, **kwargs)

    @classmethod
    def data_options(cls, config: TaskConfig) -> dict[str, Any]:
        """Settings of this task that the data module needs (``DataContext`` fields, e.g. masked LM's nsp)."""
        return {}

    @classmethod
    def logged_metrics(cls, config: TaskConfig) -> tuple[str, ...]:
        """:attr:`metrics` under ``config`` (a task whose settings add or drop metrics overrides this)."""
        return cls.metrics

    def load_pretrained(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Start from a pre-trained model's weights (``init_from``): a pre-training task (clm, mlm) takes them
        all; weights the pre-trained model may lack (:meth:`fresh_weights`) keep their fresh init."""
        load_weights_into(self.model, pretrained_weights(state_dict), self.fresh_weights())

    def fresh_weights(self) -> tuple[str, ...]:
        """Prefixes of the weights a pre-trained model may lack, which then start fresh (a BERT imported from
        a masked-LM checkpoint has no pooler and no next-sentence head)."""
        return ()

    # ------------------------------------------------------------------------------------------- LoRA
    def apply_lora(self, options: Any) -> None:
        """LoRA adapters (``model.lora``, lmexp/models/lora.py) on the backbone, whose weights freeze; a
        fine-tuning head keeps training. Call after the pre-trained weights are in. From then on checkpoints
        keep only what trains (adapters and head), and loading one needs the base weights already in place."""
        from lmexp.models.lora import apply_lora

        backbone = getattr(self.model, "backbone", self.model)
        apply_lora(backbone, options.r, options.alpha, options.dropout, options.target, key="model.lora")
        self.adapters_only = True
        self.strict_loading = (
            False  # Lightning loads the adapters onto the base; checked in on_load_checkpoint
        )

    def trained_names(self) -> set[str]:
        """State-dict names of the parameters that train (what a LoRA checkpoint keeps)."""
        return {name for name, param in self.named_parameters() if param.requires_grad}

    def check_trained_weights(self, state_dict: dict[str, Any], where: str) -> None:
        """A CheckpointError when ``state_dict`` lacks a weight that trains (a LoRA checkpoint of other
        adapters, or of another model)."""
        from lmexp.errors import CheckpointError

        missing = sorted(self.trained_names() - set(state_dict))
        if missing:
            raise CheckpointError(
                f"{where}: the checkpoint lacks {len(missing)} trained weights of this model (e.g. "
                f"{missing[0]}); expected one written by a run with the same model.lora and task"
            )

    # ---------------------------------------------------------------------------------------- metrics
    def split_values(self, split: str) -> dict[str, torch.Tensor]:
        """The split's metrics since the last call (synced across ranks by torchmetrics), then reset."""
        metrics = getattr(self, f"{split}_metrics")
        values = dict(metrics.compute())
        metrics.reset()
        return values

    def log_split(self, split: str, values: dict[str, torch.Tensor] | None = None) -> None:
        """Log ``<split>/<name>`` for every value (``loss`` on the progress bar)."""
        values = dict(self.split_values(split) if values is None else values)
        self.log(f"{split}/loss", values.pop("loss"), prog_bar=split in ("train", "val"))
        self.log_dict({f"{split}/{k}": v for k, v in values.items()})

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # Train metrics are averaged over each logging window and computed only then, so a step never waits
        # on a host sync. Logged here rather than at batch end: a checkpoint is written in
        # on_train_batch_end and keeps the step's row only if it is complete by then.
        from lmexp.training.compat import logs_this_step

        if logs_this_step(self.trainer):
            self.log_split("train")

    def on_validation_epoch_end(self) -> None:
        self.log_split("val")

    def on_test_epoch_end(self) -> None:
        self.log_split("test")

    @staticmethod
    def is_padding(batch: dict[str, Any]) -> bool:
        """An evaluation batch that only keeps FSDP ranks in step: run the model, count nothing."""
        return bool(batch.get(PADDING_KEY, False))

    # -------------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_config.build(self.model, autocast=self._under_autocast())
        if self.scheduler_config is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_config.build(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _under_autocast(self) -> bool:
        """Whether the trainer (if any yet) runs Lightning's mixed precision."""
        from lightning.pytorch.plugins.precision import MixedPrecision

        try:
            return isinstance(self.trainer.precision_plugin, MixedPrecision)
        except RuntimeError:  # not attached to a trainer (a benchmark or a tool driving the model itself)
            return False

    def configure_model(self) -> None:
        # FSDP2 sharding per block (trainer=fsdp), activation checkpointing, and in-place compilation, all
        # keeping parameter names (so checkpoints) as they are.
        from lmexp.training.distributed import configure_model

        configure_model(self)

    # ------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if (
            self.adapters_only and "state_dict" in checkpoint
        ):  # the base weights are the init_from / hf model's
            keep = self.trained_names()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["lmexp"] = dict(self.checkpoint_extras)
        # Random states, so that a resumed run draws the same dropout masks as one never stopped.
        checkpoint["lmexp"]["rng"] = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state_to_plain(np.random.get_state()),
            "python": random.getstate(),
        }
        checkpoint["lmexp"]["train_window"] = self._train_window_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.adapters_only and "state_dict" in checkpoint:
            self.check_trained_weights(checkpoint["state_dict"], "ckpt_path")
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


def pretrained_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's weights under the model's own names: ``model.`` (the task's attribute),
    ``_orig_mod.`` (torch.compile's wrapper) and ``backbone.`` (a fine-tuned run's) taken off."""
    weights = {}
    for key, value in state_dict.items():
        name = key.removeprefix("model.").removeprefix("_orig_mod.")
        weights[name.removeprefix("backbone.")] = value
    return weights


def load_weights_into(
    module: torch.nn.Module, weights: dict[str, torch.Tensor], fresh: tuple[str, ...]
) -> None:
    """Copy ``weights`` into ``module``: every weight it has must be there with its shape, except those whose
    names start with a ``fresh`` prefix (they keep their init); one-line CheckpointErrors naming init_from."""
    from lmexp.errors import CheckpointError

    own = module.state_dict()
    missing = sorted(k for k in own if k not in weights and not k.startswith(fresh or ("\0",)))
    if missing:
        raise CheckpointError(
            f"init_from: the checkpoint lacks weights of this model: {missing[:3]}"
            + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
        )
    for key, value in own.items():
        if key in weights and tuple(weights[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"init_from: weight {key} has shape {tuple(weights[key].shape)} in the checkpoint, "
                f"{tuple(value.shape)} in this model; expected the model config it was saved with"
            )
    module.load_state_dict({k: weights[k] for k in own if k in weights}, strict=False)


def _numpy_state_to_plain(state: tuple) -> list:
    """numpy's RNG state as plain lists, so checkpoints load with ``torch.load(weights_only=True)``."""
    name, keys, position, has_gauss, cached_gaussian = state
    return [name, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)]


def _numpy_state_from_plain(state: list) -> tuple:
    name, keys, position, has_gauss, cached_gaussian = state
    return (name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian)
