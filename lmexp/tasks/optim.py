"""The optimizer of every task (``conf/optim/``): its settings, parameter groups and torch's fused kernels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from lmexp.config.schema import Schema, at_least, listed, positive

# Optimizers with a fused single-kernel step in torch, on these device types.
_FUSED = ("adamw", "adam")
_FUSED_DEVICES = ("cpu", "cuda")


@dataclass
class OptimizerConfig(Schema):
    """``conf/optim/adamw.yaml``: the optimizer, built over the task's model by :meth:`build`."""

    group: ClassVar[str] = "optim"

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    """The torch optimizer: ``adamw`` (decoupled weight decay), ``adam`` or ``sgd``."""
    lr: float = positive(3e-3)
    """Peak learning rate (the schedule scales it); used as given, never rescaled by the batch size."""
    betas: list[float] = listed(lambda: [0.9, 0.95])
    """Adam's moment decay rates, two numbers in [0, 1)."""
    eps: float = positive(1e-8)
    """Adam's denominator epsilon."""
    weight_decay: float = at_least(0.1, 0.0)
    """Weight decay of the Linear weights (biases, norms and embeddings are never decayed)."""
    momentum: float = at_least(0.0, 0.0)
    """SGD's momentum (``name: sgd`` only)."""
    fused: bool | None = None
    """torch's fused single-kernel AdamW/Adam step; null = on where torch has it and nothing forbids it."""

    def problems(self) -> list[str]:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            return [f"optim.betas={self.betas}: expected two numbers in [0, 1)"]
        return []

    def build(self, model: nn.Module, autocast: bool = False) -> torch.optim.Optimizer:
        """The optimizer over ``model``'s trainable parameters, in decay / no-decay groups.

        ``autocast``: Lightning's mixed precision is on; it refuses to clip gradients for an optimizer that
        unscales them itself, as fused ones do, so the fused kernel stays off then.
        """
        groups = decay_parameter_groups(model, self.weight_decay)
        if self.name == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum)
        cls = torch.optim.AdamW if self.name == "adamw" else torch.optim.Adam
        fused = self.fused if self.fused is not None else fused_kernel_available(groups, autocast)
        return cls(groups, lr=self.lr, betas=tuple(self.betas), eps=self.eps, fused=fused or None)


def fused_kernel_available(groups: list[dict], autocast: bool = False) -> bool:
    """Whether torch's fused Adam(W) step can run on these parameters.

    AdamW's default on CPU updates one tensor at a time; the fused kernel does the whole step in one pass and
    is several times faster (bench/RESULTS.md). Kept off under mixed precision (see
    :meth:`OptimizerConfig.build`) and for FSDP2's sharded parameters (DTensors).
    """
    params = [p for group in groups for p in group["params"]]
    plain = all(type(p.data) is torch.Tensor and p.device.type in _FUSED_DEVICES for p in params)
    return bool(params) and plain and not autocast


def decay_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay only on the (>= 2-d) weights of ``nn.Linear`` layers.

    Biases, norm weights and embeddings are not decayed: shrinking them towards zero does not regularise
    anything useful and, for norms, fights their identity init. A parameter shared between an Embedding
    and a Linear (a tied lm_head) counts as an embedding, and every parameter appears exactly once.
    Frozen parameters (``requires_grad=False``, e.g. a LoRA base) are left out.

    Returns:
        ``[{"name": "decay", ...}, {"name": "no_decay", ...}]``; both groups are always present (possibly
        empty) so callers can rely on the order and names.
    """
    linear_weights: set[int] = set()
    embedding_weights: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.dim() >= 2:
            linear_weights.add(id(module.weight))
        elif isinstance(module, nn.Embedding):
            embedding_weights.add(id(module.weight))
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, param in model.named_parameters():  # a shared (tied) parameter comes once
        if not param.requires_grad:
            continue
        if id(param) in linear_weights and id(param) not in embedding_weights:
            decay.append(param)
        else:
            no_decay.append(param)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
