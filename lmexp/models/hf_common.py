"""What the Hugging Face adapters share, and the generic entry points built on them.

Each model kind has one adapter module with the same small API (lmexp/models/gpt_hf.py, bert_hf.py,
llama_hf.py)::

    HF_CLASSES: dict[str, str]        # lmexp task -> transformers class name
    DEFAULT_TASK: str                 # the task of the pre-trained model (clm or mlm)
    hf_config(config, vocab_size, special_ids, labels=None) -> transformers.PretrainedConfig
    to_hf_state_dict(state_dict, config, vocab_size, task=None) -> dict    # our names -> HF names
    from_hf(hf_config, hf_state_dict) -> (our config field values, our state_dict)

so export and import need no per-model code: :func:`to_hf_model` builds the transformers model of an
lmexp model, :func:`from_hf_model` goes the other way. transformers is imported only when a function
needs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import torch

from lmexp.errors import CheckpointError, ConfigError

SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
"""The keys ``special_ids`` may have (Hugging Face's config names); a missing key means None."""
IGNORED_HF_BUFFERS = ("attn.bias", "attn.masked_bias", "rotary_emb.inv_freq", "embeddings.position_ids")
"""Endings of keys that older Hugging Face checkpoints store but that are no weights (causal-mask and RoPE
buffers); :func:`from_hf` adapters skip them, and report any other key they do not use."""


def adapter_for(family: str) -> ModuleType:
    """The adapter module of an lmexp model kind (``gpt``, ``bert``, ``llama``: the registry names it)."""
    from lmexp.models.registry import MODELS

    adapters = {kind: spec.hf_adapter for kind, spec in MODELS.items() if spec.hf_adapter}
    if family not in adapters:
        raise ConfigError(
            f"model family {family!r} has no Hugging Face adapter; expected one of {sorted(adapters)}"
        )
    return importlib.import_module(adapters[family])


def adapter_for_hf(hf_config: Any) -> tuple[str, ModuleType]:
    """``(family, adapter)`` for a Hugging Face config, by its ``model_type``."""
    from lmexp.models.registry import MODELS

    model_type = getattr(hf_config, "model_type", None)
    kinds = {spec.hf_model_type: kind for kind, spec in MODELS.items() if spec.hf_model_type}
    if model_type not in kinds:
        raise CheckpointError(
            f"Hugging Face model_type={model_type!r} has no lmexp counterpart; expected one of "
            f"{sorted(kinds)}"
        )
    return kinds[model_type], adapter_for(kinds[model_type])


def hf_class_name(hf_classes: Mapping[str, str], family: str, task: str) -> str:
    """The transformers class name for ``task``, or a ConfigError naming the tasks that export."""
    if task not in hf_classes:
        raise ConfigError(
            f"task={task} of a {family} has no Hugging Face model class; expected one of {sorted(hf_classes)}"
        )
    return hf_classes[task]


def special_token_kwargs(special_ids: Mapping[str, int | None]) -> dict[str, int | None]:
    """``bos_token_id``/``eos_token_id``/``pad_token_id`` for a config; unknown keys are a ValueError."""
    unknown = sorted(set(special_ids) - set(SPECIAL_TOKEN_KEYS))
    if unknown:
        raise ValueError(
            f"special_ids has unknown keys {unknown}; expected some of {list(SPECIAL_TOKEN_KEYS)}"
        )
    return {key: special_ids.get(key) for key in SPECIAL_TOKEN_KEYS}


def label_kwargs(labels: list[str] | None) -> dict[str, Any]:
    """``num_labels``, ``id2label`` and ``label2id`` of a classifier's config (nothing without labels)."""
    if labels is None:
        return {}
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }


def require_setting(
    hf_config: Any, key: str, allowed: Callable[[Any], bool], expected: str, family: str
) -> None:
    """A CheckpointError naming ``key`` when the Hugging Face config's value is not ``allowed``."""
    value = getattr(hf_config, key, None)
    if not allowed(value):
        raise CheckpointError(
            f"Hugging Face {hf_config.model_type} config {key}={value!r} cannot be expressed as an lmexp "
            f"{family}: expected {expected}"
        )


class HFWeights:
    """A Hugging Face state dict read key by key with shape checks; remembers which keys were used."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], family: str) -> None:
        self.state_dict, self.family, self.used = state_dict, family, set()

    def __contains__(self, key: str) -> bool:
        return key in self.state_dict

    def take(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor at ``key``; a CheckpointError if it is missing or not of ``shape``."""
        if key not in self.state_dict:
            raise CheckpointError(
                f"Hugging Face {self.family} state dict has no {key}; expected shape {shape}"
            )
        tensor = self.state_dict[key]
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"Hugging Face {self.family} weight {key} has shape {tuple(tensor.shape)}; "
                f"the config implies {tuple(shape)}"
            )
        self.used.add(key)
        return tensor

    def check_all_used(self) -> None:
        """A CheckpointError naming the first weight no lmexp parameter takes (e.g. a bias lmexp lacks)."""
        ignored = tuple(f".{name}" for name in IGNORED_HF_BUFFERS)  # whole name parts: not c_attn.bias
        unused = sorted(key for key in self.state_dict if key not in self.used and not key.endswith(ignored))
        if unused:
            more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
            raise CheckpointError(
                f"Hugging Face {self.family} weight {unused[0]}{more} has no place in an lmexp "
                f"{self.family}; expected the architecture its config describes"
            )


def load_weights(hf_model: Any, weights: Mapping[str, torch.Tensor]) -> Any:
    """``hf_model`` with ``weights`` copied in and in eval mode; every parameter must be among them.

    A missing or unknown name is a RuntimeError: the adapter's mapping is out of date (a bug, not a user
    error).
    """
    params = {name for name, _ in hf_model.named_parameters(remove_duplicate=False)}
    missing = sorted(params - set(weights))
    unknown = sorted(set(weights) - set(hf_model.state_dict()))
    if missing or unknown:
        raise RuntimeError(f"Hugging Face mapping: missing {missing[:5]}, unknown {unknown[:5]}")
    hf_model.load_state_dict({k: v.detach().clone().contiguous() for k, v in weights.items()}, strict=False)
    return hf_model.eval()


def to_hf_model(
    family: str,
    config: Any,
    state_dict: Mapping[str, torch.Tensor],
    vocab_size: int,
    special_ids: Mapping[str, int | None],
    task: str | None = None,
    labels: list[str] | None = None,
) -> Any:
    """The transformers model (eval mode, fp32 as given) equivalent to an lmexp model.

    Args:
        family: ``gpt``, ``bert`` or ``llama``.
        config: The lmexp model config (GPTConfig, BERTConfig, LlamaConfig; for a fine-tuned model its
            backbone's).
        state_dict: The lmexp model's ``state_dict()`` (for fine-tuning tasks the task model's, with
            ``backbone.*`` and ``classifier.*``).
        vocab_size: The tokenizer's vocabulary size (padded rows are dropped).
        special_ids: ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` for the config.
        task: The lmexp task (the adapter's ``DEFAULT_TASK`` when None); picks the class in ``HF_CLASSES``.
        labels: Label names of a classifier (classify, ner).
    """
    import transformers

    adapter = adapter_for(family)
    task = task or adapter.DEFAULT_TASK
    hf_class = getattr(transformers, hf_class_name(adapter.HF_CLASSES, family, task))
    hf_config = adapter.hf_config(config, vocab_size, special_ids, labels)
    weights = adapter.to_hf_state_dict(state_dict, config, vocab_size, task=task)
    return load_weights(hf_class(hf_config), weights)


def from_hf_model(hf_model: Any) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """``(family, our config field values, our state_dict)`` of a transformers model."""
    family, adapter = adapter_for_hf(hf_model.config)
    fields, state_dict = adapter.from_hf(hf_model.config, hf_model.state_dict())
    return family, fields, state_dict
