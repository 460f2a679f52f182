"""Checks that span config groups (the model supports the task, the data feeds it, sizes agree).

Pure: each function reads the typed settings (lmexp/config/settings.py) and returns problems, one line each,
naming the keys; nothing here edits a config or touches a file. A group's own checks live in its schema.
"""

from __future__ import annotations

from typing import Any

from lmexp.config.compose import choice
from lmexp.config.schema import name_problem


def cross_group_problems(settings: Any, pretrained: Any = None) -> list[str]:
    """Every problem between groups of ``settings``; ``pretrained``: the ``init_from`` model, if any."""
    task_class = settings.task_class
    problems = task_problems(settings, task_class, pretrained)
    if problems:  # the rest assumes the task, model and data belong together
        return problems
    return (
        sequence_problems(settings, task_class, pretrained)
        + pretrained_problems(settings, pretrained)
        + document_mask_problems(settings, task_class)
        + lora_problems(settings, pretrained)
        + own_model_problems(settings)
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
    return init_from_problems(settings, task_class, pretrained)


def init_from_problems(settings: Any, task_class: Any, pretrained: Any) -> list[str]:
    """The rule of ``init_from``: any task the pre-trained model's kind runs starts from its weights (a fresh
    head for classify/ner; its own head for clm/mlm: continued pre-training, with a new optimizer and
    schedule from step 0; ``ckpt_path`` is what continues a run exactly). ``hf:<dir or id>`` imports into
    lmexp's own kind, so it does not go with model=hf, which trains the transformers model itself."""
    if pretrained is None:
        return []
    problems = []
    if str(settings.run.init_from).startswith("hf:") and choice("model", "") == "hf":
        name = str(settings.run.init_from).removeprefix("hf:")
        problems.append(
            f"init_from={settings.run.init_from} imports into lmexp's own gpt, bert or llama; with model=hf "
            f"the transformers model trains itself: give model.name_or_path={name} instead"
        )
    nsp = getattr(settings.task, "nsp", False)
    if task_class.name == "mlm" and nsp and pretrained.lacks_weight("nsp_head.weight"):
        problems.append(
            f"task.nsp=true: init_from={settings.run.init_from} has no next-sentence head (a masked-LM "
            "checkpoint); set task.nsp=false"
        )
    return problems


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
    if pretrained is None or settings.model_spec.layout != "cls_sep" or not settings.task_class.fine_tuning:
        return []
    missing = pretrained.lacks_tokens(("[CLS]", "[SEP]"))
    if missing:
        return [
            f"init_from={settings.run.init_from}: its tokenizer has no {' or '.join(missing)} token, which a "
            f"{settings.model_spec.kind} classifier needs"
        ]
    return []


# Keys of the logger and callback nodes that become a file or directory name inside the run dir (W&B's name
# and project do not, but W&B refuses paths there too): each must be a plain name (schema.name_problem).
LOGGER_NAME_KEYS = {
    "csv": ("name", "version"),
    "tensorboard": ("name", "version"),
    "wandb": ("name", "project"),
}
EMPTY_ALLOWED = {"csv", "tensorboard"}  # an empty name or version there means "no subdirectory"


def output_name_problems(loggers: Any, callbacks: Any) -> list[str]:
    """Logger names and versions and the checkpoint file name that would reach outside the run dir
    (``logger.csv.name=../..``); ``loggers``, ``callbacks``: the plain ``logger`` and ``callbacks`` nodes."""
    found = []
    named = [
        (f"logger.{logger}.{key}", (loggers.get(logger) or {}).get(key), logger in EMPTY_ALLOWED)
        for logger, keys in LOGGER_NAME_KEYS.items()
        if isinstance(loggers, dict) and isinstance(loggers.get(logger), dict)
        for key in keys
    ]
    checkpoint = callbacks.get("checkpoint") if isinstance(callbacks, dict) else None
    if isinstance(checkpoint, dict):
        named.append(("callbacks.checkpoint.filename", checkpoint.get("filename"), False))
    for key, value, empty_allowed in named:
        if value is None or (value == "" and empty_allowed):
            continue
        if problem := name_problem(str(value)):
            found.append(f"{key}={value!r}: {problem}")
    return found


def document_mask_problems(settings: Any, task_class: Any) -> list[str]:
    """``data.document_mask`` needs packed blocks and a model kind whose attention takes ``document_ids``."""
    if not getattr(settings.data, "document_mask", False):
        return []
    spec = settings.model_spec
    if task_class.data_format != "blocks":
        return [f"data.document_mask=true: task={task_class.name} reads no packed blocks; set it to false"]
    if not spec.document_mask:
        from lmexp.models.registry import MODELS

        able = ", ".join(kind for kind, other in MODELS.items() if other.document_mask)
        return [
            f"data.document_mask=true: model={choice('model', spec.kind)} cannot mask attention at document "
            f"boundaries (model kinds that can: {able}); set data.document_mask=false"
        ]
    return []


def lora_problems(settings: Any, pretrained: Any) -> list[str]:
    """LoRA adapts pre-trained weights: it needs ``init_from`` or a pre-trained ``model=hf``."""
    model = settings.model
    hf_weights = settings.model_spec.own_tokenizer and getattr(model, "pretrained", False)
    if model.lora.enabled and pretrained is None and not hf_weights:
        return [
            f"model.lora.r={model.lora.r}: LoRA trains adapters on pre-trained weights, which this run does "
            "not start from; give init_from=<run dir, .ckpt or hf:model>, or model=hf with "
            "model.pretrained=true"
        ]
    return []


def own_model_problems(settings: Any) -> list[str]:
    """model=hf's masked LMs have no next-sentence head (transformers' ``...ForMaskedLM``)."""
    if settings.model_spec.own_tokenizer and getattr(settings.task, "nsp", False):
        return [
            "task.nsp=true: model=hf trains masked LM only (transformers' masked-LM models have no "
            "next-sentence head); set task.nsp=false"
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
