"""What every benchmark shares: interleaved timing, one result type, and a description of the machine.

Machines are shared and noisy, so no figure stands alone: each benchmark times lmexp and a peer in the
same process, in alternating rounds (A B, B A, A B, ...), and reports the median of the rounds and
their ratio. Noise that hits both sides of a round cancels out of the ratio.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Result:
    """One benchmark's figures: the measured values, the ratio against its peer, and its goal."""

    name: str
    """Short name, e.g. ``model_step/gpt``."""
    values: dict[str, float]
    """Measured figures (units in the key, e.g. ``lmexp_tokens_per_sec``)."""
    ratio: float | None = None
    """The headline ratio (see ``ratio_meaning``); None when there is no peer."""
    ratio_meaning: str = ""
    """What the ratio divides, e.g. ``lmexp / HF tokens/s``."""
    goal: str = ""
    """The target, e.g. ``>= 1.2``."""
    met: bool | None = None
    """Whether the goal holds; None when the goal is not a number to check."""
    notes: list[str] = field(default_factory=list)
    """Settings a reader needs to trust the figure (sizes, threads, rounds)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "values": self.values,
            "ratio": self.ratio,
            "ratio_meaning": self.ratio_meaning,
            "goal": self.goal,
            "met": self.met,
            "notes": self.notes,
        }


def interleaved(
    candidates: dict[str, Callable[[], None]], rounds: int, repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one figure per round, with the candidates taking turns.

    Each round times ``repeats`` calls of every candidate in turn; the order flips every round so that
    neither side always runs first (e.g. right after the other's memory traffic). ``warmup`` untimed
    calls of each candidate come first (allocator, caches, lazy initialisation).
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    names = list(candidates)
    per_call: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            fn = candidates[name]
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            per_call[name].append((time.perf_counter() - start) / repeats)
    return per_call


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> float:
    """Relative spread of the rounds, (max - min) / median: how much to trust a median."""
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid else 0.0


def machine() -> dict[str, Any]:
    """The machine and the versions that decide speed, recorded with every result file."""
    import torch

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "host_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for package in ("lightning", "transformers", "sentencepiece", "torchmetrics"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
