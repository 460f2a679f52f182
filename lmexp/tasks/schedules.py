"""Learning-rate schedules (``conf/scheduler/``): a ``LambdaLR`` over a picklable rule, stepped per step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from lmexp.config.schema import Schema, at_least, between


@dataclass
class WarmupCosine:
    """Multiplier of the base learning rate at a given optimizer step.

    Linear warm-up from 1/(warmup_steps+1) to 1 over ``warmup_steps``, then cosine decay from 1 to
    ``min_lr_ratio`` at ``max_steps``, constant after. A dataclass, not a lambda, so that LambdaLR
    stores it in its state dict and a resumed run continues the same curve.
    """

    warmup_steps: int
    max_steps: int
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.max_steps < 0:  # an open-ended run has no end to decay towards
            return 1.0
        decay_steps = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


@dataclass
class ScheduleConfig(Schema):
    """``conf/scheduler/cosine.yaml`` and ``constant.yaml`` (``min_lr_ratio: 1``): warm-up, then cosine
    decay."""

    group: ClassVar[str] = "scheduler"

    warmup_steps: int = at_least(40, 0)
    """Optimizer steps of linear warm-up from ~0 to the peak learning rate."""
    max_steps: int = at_least(300, -1)
    """The step at which the decay reaches ``min_lr_ratio`` (the run's trainer.max_steps; -1 = no decay)."""
    min_lr_ratio: float = between(0.1, 0.0, 1.0)
    """The learning rate at the end of the decay, as a fraction of the peak (1 = constant after warm-up)."""

    def build(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """The scheduler over ``optimizer``."""
        rule = WarmupCosine(self.warmup_steps, self.max_steps, self.min_lr_ratio)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, rule)
