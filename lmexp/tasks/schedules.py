"""Learning-rate schedules, built as ``torch.optim.lr_scheduler.LambdaLR`` over a picklable rule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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
        decay_steps = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the base rate; stepped per optimizer step."""
    rule = WarmupCosine(warmup_steps, max_steps, min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, rule)
