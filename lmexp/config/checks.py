"""Checks that span config groups (the model supports the task, the data feeds it, sizes agree).

Pure: each function reads the typed settings (lmexp/config/settings.py) and returns problems, one line each,
naming the keys; nothing here edits a config or touches a file. A group's own checks live in its schema.
"""

from __future__ import annotations

from typing import Any

from lmexp.config.compose import choice


def cross_group_problems(settings: Any, pretrained: Any = None) -> list[str]:
    """Every problem between groups of ``settings``; ``pretrained``: the ``init_from`` model, if any."""
    task_class = settings.task_class
    problems = task_problems(settings, task_class, pretrained)
    if problems:  # the rest assumes the task, model and data belong together
        return problems
    return (
        sequence_problems(settings, task_class, pretrained)
        + pretrained_problems(settings, pretrained)
        + lora_problems(settings, pretrained)
        + own_model_problems(settings)
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
