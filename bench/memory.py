"""Memory: the peak of tensor memory that one training step adds, lmexp's GPT against Hugging Face's GPT-2.

Both sides are the closures of the model-step benchmark (bench/model_step.py): same dimensions, batch,
inputs and optimizer. Each runs two warm-up steps (AdamW creates its state in the first), then one step
under ``torch.profiler`` with ``profile_memory=True``; the profiler records every tensor allocation and
free, and the running sum of those, from the step's start, has a maximum: the step's peak on top of what
was already held (parameters, optimizer state). Allocation sizes do not depend on timing, so one step
each is the measurement; no interleaving is needed.

Two vocabularies: the model-step benchmark's 4000, and GPT-2's 50257, where the output layer's logits
dominate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import Result
from bench.model_step import GPT2_VOCAB_SHAPE, GPT_SHAPE, SMOKE_SHAPE, StepShape, gpt_steps


def step_peak_bytes(step: Callable[[], None], warmup: int = 2) -> int:
    """Highest tensor memory during one call of ``step``, above what was allocated when it started."""
    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    level = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        level += event.nbytes()  # negative for a free
        peak = max(peak, level)
    return peak


def run(smoke: bool = False, overrides: list[str] | None = None) -> list[Result]:
    results = []
    shapes = {"gpt": SMOKE_SHAPE} if smoke else {"gpt": GPT_SHAPE, "gpt_vocab_50257": GPT2_VOCAB_SHAPE}
    for name, shape in shapes.items():
        steps = gpt_steps(shape, overrides or [])
        peaks = {side: step_peak_bytes(step) for side, step in steps.items()}
        del steps
        ours, theirs = peaks["lmexp"], peaks["hf"]
        results.append(
            Result(
                name=f"memory/{name}",
                values={"lmexp_step_peak_mb": ours / 2**20, "hf_step_peak_mb": theirs / 2**20},
                ratio=theirs / ours,
                ratio_meaning="HF / lmexp peak tensor memory of one training step",
                notes=[
                    _describe(shape),
                    "above parameters and optimizer state; torch.profiler's allocation records",
                ],
            )
        )
    return results


def _describe(shape: StepShape) -> str:
    return shape.describe() + f", {torch.get_num_threads()} threads"
