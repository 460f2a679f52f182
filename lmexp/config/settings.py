"""A run's settings: every config group of ``conf/train.yaml`` parsed into its typed schema, once.

:func:`load_settings` reads each group's node into the dataclass its ``_target_`` names (the schemas live
next to the code they configure; lmexp/config/schema.py checks types, ranges and unknown keys), runs the
cross-group checks of :mod:`lmexp.config.checks`, and raises one :class:`~lmexp.errors.ConfigError` naming
every problem, before any data work. The builders take what it returns; nothing parses a group twice.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from dataclasses import field as dataclasses_field
from typing import Any, ClassVar, Literal

from omegaconf import DictConfig

from lmexp.config.schema import Schema, collect, listed, parse, plain, plain_name, signature_problems
from lmexp.errors import ConfigError


@dataclass
class SweepOptions(Schema):
    """``sweep.*`` in conf/train.yaml: how a sweep (``-m``) names, repeats and ranks its points."""

    group: ClassVar[str] = "sweep"

    name: str = plain_name("sweep")
    """The sweep's name: its dir (outputs/multirun/<name>/<n>/) and the W&B group of its runs."""
    rerun: bool = False
    """Run finished points again (from scratch) instead of skipping them."""
    direction: Literal["minimize", "maximize"] = "minimize"
    """Of ``objective``, for the summary's and the report's best point."""
    report: bool = True
    """Write report.{csv,md,html} and plots into the sweep dir at the end."""
    extra: dict[str, Any] = listed(dict)
    """Settings of a ready sweep (``+sweep=<name>`` configs may add their own keys)."""

    @classmethod
    def passes_through(cls, name: str) -> bool:
        return True


@dataclass
class RunOptions(Schema):
    """The top-level keys of conf/train.yaml."""

    seed: int = 1234
    """Seed for torch, numpy and Python's random (the data order and the model init follow from it)."""
    ckpt_path: str | None = None
    """Resume from this checkpoint: weights, optimizer, scheduler, step and data position."""
    resume: Literal["auto", "never"] = "auto"
    """Without ckpt_path: ``auto`` continues from the newest readable checkpoint in this run dir's
    checkpoints/, ``never`` always starts afresh."""
    init_from: str | None = None
    """Fine-tuning starts from this pre-trained run (a run dir or a .ckpt): its model and tokenizer, a new
    head."""
    objective: str = "val/loss"
    """The metric the run returns to Hydra's sweepers (minimised), read from metrics.json."""
    run_test: bool = True
    """Evaluate the final model on the test split after training (when the data has one)."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    run_name: str = plain_name("run")
    """A name for the run, used by the loggers."""


@dataclass
class RunSettings:
    """Every group of a training run, typed and checked."""

    run: RunOptions
    model: Any
    """The model kind's config dataclass (lmexp/models/<kind>.py)."""
    task: Any
    """The task's config dataclass (lmexp/tasks/<task>.py)."""
    data: Any
    """The data config dataclass (lmexp/data/)."""
    tokenizer: Any
    """:class:`lmexp.data.tokenizer.TokenizerConfig`."""
    optim: Any
    """:class:`lmexp.tasks.optim.OptimizerConfig`."""
    scheduler: Any
    """:class:`lmexp.tasks.schedules.ScheduleConfig`, or None (constant learning rate)."""
    trainer: Any
    """:class:`lmexp.training.trainer.TrainerConfig`."""
    callbacks: dict[str, dict[str, Any]] = dataclasses_field(default_factory=dict)
    """The ``callbacks`` group: each callback's node (``_target_`` and its arguments), by name; the off
    (null) ones left out."""

    @property
    def model_spec(self) -> Any:
        """The model kind's registry entry."""
        from lmexp.models.registry import spec_for

        return spec_for(self.model)

    @property
    def task_class(self) -> Any:
        """The task's LightningModule class."""
        return self.task.task_type()


def target_class(node: Any, key: str) -> type:
    """The class a config node's ``_target_`` names."""
    target = node.get("_target_") if hasattr(node, "get") else None
    if not isinstance(target, str) or "." not in target:
        raise ConfigError(f"{key}._target_={target!r}: expected the import path of the group's config class")
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise ConfigError(f"{key}._target_={target}: no such class") from None


def group(cfg: DictConfig, key: str, **extra: Any) -> Any:
    """The typed config of group ``key`` (its ``_target_``'s dataclass)."""
    node = cfg.get(key)
    return parse(target_class(node, key), node, key, **extra)


def callback_nodes(cfg: DictConfig, problems: list[str]) -> dict[str, dict[str, Any]]:
    """The ``callbacks`` group's nodes by name (null ones are off), each checked against the signature of
    the class it instantiates (Lightning's callbacks and lmexp's); problems are appended to ``problems``."""
    nodes = {}
    for name in cfg.get("callbacks") or {}:
        node = collect(problems, lambda name=name: plain(cfg.callbacks[name]))
        if not node:
            continue
        key = f"callbacks.{name}"
        if not isinstance(node, dict) or not isinstance(node.get("_target_"), str):
            problems.append(f"{key}={node!r}: expected a node with the _target_ of a callback class, or null")
            continue
        problems.extend(signature_problems(node["_target_"], node, key))
        nodes[str(name)] = node
    return nodes


def load_settings(cfg: DictConfig, pretrained: Any = None) -> RunSettings:
    """Every group of ``cfg`` parsed and checked; one ConfigError listing all problems.

    ``pretrained``: the ``init_from`` run (lmexp.training.build.Pretrained) when fine-tuning from one.
    """
    from lmexp.config.checks import cross_group_problems, output_name_problems

    problems: list[str] = []
    top = {k: v for k, v in plain(cfg).items() if k in RunOptions.__dataclass_fields__}
    run = collect(problems, lambda: parse(RunOptions, top, ""))
    collect(problems, lambda: parse(SweepOptions, cfg.get("sweep") or {}, "sweep"))
    problems += output_name_problems(plain(cfg.get("logger") or {}), plain(cfg.get("callbacks") or {}))
    parts = {
        name: collect(problems, lambda name=name: group(cfg, name))
        for name in ("model", "task", "data", "tokenizer", "optim", "trainer")
    }
    scheduler = collect(problems, lambda: group(cfg, "scheduler")) if cfg.get("scheduler") else None
    callbacks = callback_nodes(cfg, problems)
    if problems:
        raise ConfigError(problems)
    settings = RunSettings(run=run, scheduler=scheduler, callbacks=callbacks, **parts)
    problems = cross_group_problems(settings, pretrained)
    if problems:
        raise ConfigError(problems)
    return settings
