"""LoRA fine-tuning of any lmexp (or Hugging Face) model through the ``peft`` library.

:func:`apply_lora` puts low-rank adapters (Hu et al. 2021, "LoRA") on the Linear layers named by
``target`` and freezes everything else, so training updates only the adapters; :func:`merge_lora` folds
them back into the Linear weights, giving the plain model (same parameter names as before) for export.
peft's ``inject_adapter_in_model`` works on plain ``nn.Module`` s, so the models need no change.

A target names a module-name suffix, as peft matches them: ``"qkv"`` matches ``blocks.0.attn.qkv``, and
``"attn.proj"`` only the attention's output projection where ``"proj"`` would match the MLP's too.

In a run, :class:`LoRAOptions` is the ``model.lora`` node of every model kind (``model.lora.r=8
model.lora.target=[q_proj,v_proj]``); the task applies it to its backbone after the pre-trained weights are in
(lmexp/tasks/base.py, ``Task.apply_lora``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lmexp.config.schema import Schema, between, listed, parse, positive
from lmexp.errors import ConfigError

ADAPTER_NAME = "default"  # peft's name for the one adapter lmexp uses
# Output layers whose weight the loss reads directly (linear_cross_entropy in lmexp/models/head_loss.py),
# which would bypass an adapter's forward; tied heads are refused as shared weights anyway.
_HEAD_NAMES = ("lm_head",)


@dataclass
class LoRAOptions(Schema):
    """``model.lora``: low-rank adapters on some Linear layers of any model kind; off while ``r`` is null."""

    group: ClassVar[str] = "model.lora"

    r: int | None = positive(None)
    """Rank of the adapters; null = no LoRA (every weight trains)."""
    alpha: float = positive(16.0)
    """Scale numerator: an adapter's update is multiplied by ``alpha / r``."""
    dropout: float = between(0.0, 0.0, 1.0, high_open=True)
    """Dropout on the adapters' input, in [0, 1)."""
    target: list[str] = listed(list)
    """Module-name suffixes of the Linear layers to adapt (``[q_proj, v_proj]``; a wrong one lists the
    names that exist)."""

    @property
    def enabled(self) -> bool:
        """Whether adapters are added (``r`` is set)."""
        return self.r is not None

    def problems(self) -> list[str]:
        if self.enabled and (not self.target or not all(self.target)):
            return [
                f"{self.group}.target={self.target}: expected a non-empty list of module-name suffixes, e.g. "
                f"{self.group}.target=[q_proj,v_proj]"
            ]
        return []


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of targets: the whole module name, or its ending after a dot."""
    return name == target or name.endswith(f".{target}")


def _is_linear(module: nn.Module) -> bool:
    """A layer peft's LoRA adapts as a matrix: ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2's Linear
    with a transposed weight)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_module_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s Linear layers, one per kind: block indices stripped (``attn.qkv``, not
    ``blocks.0.attn.qkv``), in order of first appearance."""
    names: dict[str, None] = {}
    for name, module in model.named_modules():
        if _is_linear(module):
            names[re.sub(r"^(.*\.)?\d+\.", "", name)] = None  # after the last numeric part
    return list(names)


def _check_settings(r: int, alpha: float, dropout: float, target: Sequence[str], key: str) -> None:
    """The settings checked as a ``model.lora`` node is (one home for the rules: :class:`LoRAOptions`)."""
    parse(LoRAOptions, {"r": r, "alpha": alpha, "dropout": dropout, "target": target}, key)
    if r is None:
        raise ConfigError(f"{key}.r=null: expected the adapters' rank, an int >= 1")


def _output_layers(model: nn.Module) -> set[int]:
    """ids of the layers whose weight a loss reads directly: lmexp's ``lm_head`` s, and a Hugging Face
    model's output embeddings."""
    found = {id(module) for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in _HEAD_NAMES}
    for module in model.modules():
        get_output = getattr(module, "get_output_embeddings", None)
        if callable(get_output) and isinstance(output := get_output(), nn.Module):
            found.add(id(output))
    return found


def _check_targets(model: nn.Module, target: Sequence[str], key: str) -> None:
    """ConfigError for a target that matches no Linear layer, or one that LoRA cannot adapt here."""
    linears = {name: module for name, module in model.named_modules() if _is_linear(module)}
    unmatched = [t for t in target if not any(_matches(name, t) for name in linears)]
    if unmatched:
        raise ConfigError(
            f"{key}.target={list(target)}: {unmatched} match no Linear layer of the model; expected suffixes "
            f"of its Linear layers: {linear_module_names(model)}"
        )
    # A weight shared with another module (a tied output layer) would change that module too on merging.
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(name)
    heads = _output_layers(model)
    for name, module in linears.items():
        if not any(_matches(name, t) for t in target):
            continue
        if id(module) in heads:
            raise ConfigError(
                f"{key}.target={list(target)} matches the output layer {name}: expected other layers "
                "(the loss reads its weight directly, so an adapter there would be skipped)"
            )
        shared = [other for other in owners[id(module.weight)] if other != name]
        if shared:
            raise ConfigError(
                f"{key}.target={list(target)} matches {name}, whose weight is tied to {shared[0]}: expected "
                "layers with weights of their own"
            )


def apply_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float,
    target: Sequence[str],
    key: str = "lora",
) -> nn.Module:
    """Add LoRA adapters to the Linear layers matching ``target`` and freeze every other parameter.

    The model is changed in place (and returned): each matched ``nn.Linear`` becomes peft's LoRA Linear,
    whose output is ``base(x) + (alpha / r) * B(A(dropout(x)))`` with A (r, in) random and B (out, r) zero,
    so the adapted model starts out equal to the base model.

    Args:
        model: Any module (an lmexp GPT, Llama, BERT, or a Hugging Face model).
        r: Rank of the adapters.
        alpha: Scale numerator: the update is multiplied by ``alpha / r``.
        dropout: Dropout on the adapters' input, in [0, 1).
        target: Module-name suffixes of the Linear layers to adapt, e.g. ``["qkv", "proj"]`` for gpt or
            ``["q_proj", "v_proj"]`` for llama; each must match at least one Linear layer.
        key: Config key that errors name (``{key}.r``, ``{key}.target``, ...).
    """
    from peft import LoraConfig, inject_adapter_in_model

    _check_settings(r, alpha, dropout, target, key)
    _check_targets(model, target, key)
    # GPT-2's Conv1D stores its weight as (in, out); peft must be told, or it warns and finds out itself.
    conv1d = any(
        type(m).__name__ == "Conv1D" and any(_matches(n, t) for t in target) for n, m in model.named_modules()
    )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        target_modules=list(target),
        fan_in_fan_out=conv1d,
    )
    model = inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    # peft freezes the base weights; freeze the rest too (norms, embeddings), so only adapters train.
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its Linear weight and put the plain Linear back; returns ``model``.

    Changes ``model`` in place: its parameter names become those it had before :func:`apply_lora`, its
    outputs stay those of the adapted model (up to float rounding), and every parameter is trainable again,
    as in a freshly built model. For export (lmexp/models/hf_common.py) and for further full training.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in adapted:
        module.merge(safe_merge=True)  # raises if the merged weight has NaNs
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only (peft's names without the adapter name, e.g. ``...qkv.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of distinct parameters that require gradients (a tied matrix counts once)."""
    return sum(param.numel() for param in model.parameters() if param.requires_grad)
