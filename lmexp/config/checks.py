"""Checks that span config groups (the model supports the task, the data feeds it, sizes agree).

Pure: each function reads the typed settings (lmexp/config/settings.py) and returns problems, one line each,
naming the keys; nothing here edits a config or touches a file. A group's own checks live in its schema.
"""

from __future__ import annotations

from typing import Any

from lmexp.config.compose import choice


def cross_group_problems(settings: Any, pretrained: Any = None) -> list[str]:
    """Every problem between groups of ``settings``; ``pretrained``: the ``init_from`` run, if any."""
    task_class = settings.task_class
    problems = task_problems(settings, task_class, pretrained)
    if problems:  # the rest assumes the task, model and data belong together
        return problems
    return (
        sequence_problems(settings, task_class, pretrained)
        + pretrained_problems(settings, pretrained)
        + callback_problems(settings, task_class)
    )


def task_problems(settings: Any, task_class: Any, pretrained: Any) -> list[str]:
    """The model kind runs the task, the data gives the task's examples, init_from only for fine-tuning."""
    spec = settings.model_spec
    task = choice("task", task_class.name)
    if pretrained is not None:
        where = f"init_from={settings.run.init_from}"
    else:
        where = f"model={choice('model', spec.kind)}"
    if task_class.name not in spec.tasks:
        if task_class.fine_tuning:
            return [f"{where}: a {spec.kind} model cannot be fine-tuned for task={task}"]
        return [f"task={task} is not supported by {where} (it supports task={' or task='.join(spec.tasks)})"]
    if task_class.data_format not in settings.data.example_formats:
        return [f"task={task} {task_class.data_hint}"]
    if settings.data.training_problems():
        return settings.data.training_problems()
    if settings.run.init_from and not task_class.fine_tuning:
        return [
            f"init_from={settings.run.init_from}: only fine-tuning tasks (task=classify, ner, qa, sft) "
            "start from pre-trained weights; to continue a run, use ckpt_path"
        ]
    return []


def sequence_problems(settings: Any, task_class: Any, pretrained: Any) -> list[str]:
    """``data.block_size`` fits the model's positions and the task's minimum."""
    block_size = settings.data.block_size
    problems = []
    max_seq_len = getattr(settings.model, "max_seq_len", None)
    if max_seq_len is not None and block_size > max_seq_len:
        where = (
            f"max_seq_len={max_seq_len} of init_from={settings.run.init_from}"
            if pretrained
            else (f"model.max_seq_len={max_seq_len}")
        )
        problems.append(f"data.block_size={block_size} exceeds {where}")
    minimum = task_class.min_block_size
    if block_size < minimum:
        problems.append(
            f"data.block_size={block_size}: task={task_class.name} needs sequences of at least "
            f"{minimum} tokens"
        )
    return problems


def pretrained_problems(settings: Any, pretrained: Any) -> list[str]:
    """An ``init_from`` run whose tokenizer lacks what the model kind frames examples with."""
    if pretrained is None or settings.model_spec.layout != "cls_sep":
        return []
    missing = [token for token in ("[CLS]", "[SEP]") if not pretrained.has_token(token)]
    if missing:
        return [
            f"init_from={settings.run.init_from}: its tokenizer has no {' or '.join(missing)} token, which a "
            f"{settings.model_spec.kind} classifier needs"
        ]
    return []


def monitorable(settings: Any, task_class: Any) -> list[str]:
    """The metric names a callback can monitor in this run: ``val/<m>`` of each metric the task logs, and
    ``train/loss``."""
    return [f"val/{name}" for name in task_class.logged_metrics(settings.task)] + ["train/loss"]


def callback_problems(settings: Any, task_class: Any) -> list[str]:
    """Callbacks that cannot work in this run: a monitor on a metric the task never logs, the harness on
    a model that is no language model, an EMA decay outside (0, 1), weight averaging of sharded weights."""
    problems = []
    task = choice("task", task_class.name)
    known = monitorable(settings, task_class)
    for name, node in settings.callbacks.items():
        monitor = node.get("monitor")
        if monitor is not None and monitor not in known:
            problems.append(
                f"callbacks.{name}.monitor={monitor}: task={task} never logs it; it logs {', '.join(known)}"
            )
    harness = settings.callbacks.get("harness", {})
    if harness.get("tasks") and not task_class.language_model:
        problems.append(
            f"callbacks.harness.tasks: lm-evaluation-harness scores causal language models; task={task} "
            "trains none (set callbacks.harness.tasks=null)"
        )
    for name, node in settings.callbacks.items():
        decay = node.get("decay", 0.5) if node["_target_"].endswith("EMAWeightAveraging") else 0.5
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 < decay < 1:
            problems.append(
                f"callbacks.{name}.decay={decay!r}: expected a number between 0 and 1 (e.g. 0.999)"
            )
    sharded = settings.trainer.strategy_name == "FSDP2Strategy"
    averaging = [name for name, node in settings.callbacks.items() if "WeightAveraging" in node["_target_"]]
    if sharded and averaging:
        problems.append(
            f"callbacks.{averaging[0]}: weight averaging keeps a whole copy of the model, which trainer=fsdp "
            "shards; use it with trainer=ddp"
        )
    return problems
