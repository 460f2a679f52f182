"""User-facing errors: bad input becomes one clear line, never a traceback.

Code anywhere in lmexp raises :class:`UserError` (or a subclass) for problems the user can fix: a bad
config value, a missing file, a corrupt checkpoint. The entry points catch it, print one line that
names the culprit, and exit non-zero. ``HYDRA_FULL_ERROR=1`` re-raises with the full traceback.
"""

from __future__ import annotations

import os
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input; the message names the file or key and what was expected."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # always one line


class ConfigError(UserError):
    """One or more config values are invalid; all problems are listed in one line."""

    def __init__(self, problems: list[str] | str) -> None:
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class DataError(UserError):
    """A corpus, split or cache file is missing, empty or malformed."""


class CheckpointError(UserError):
    """A checkpoint is missing, truncated, or does not fit the run."""


class Preempted(Exception):
    """The run stopped on a preemption signal after saving ``checkpoint``."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None, requeued: bool) -> None:
        self.signal_name, self.step, self.checkpoint, self.requeued = signal_name, step, checkpoint, requeued
        saved = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint could be saved"
        then = "job requeued" if requeued else "run it again with resume=auto and the same hydra.run.dir"
        super().__init__(f"stopped by {signal_name} at step {step}; {saved}; {then}")


def full_errors_requested() -> bool:
    """True when the user asked for full tracebacks, as Hydra does with ``HYDRA_FULL_ERROR=1``."""
    return os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0")


class TrialPruned(Exception):
    """The run's Optuna trial was pruned at a validation: its ``objective`` was ``value`` at ``step``."""

    def __init__(self, objective: str, value: float, step: int) -> None:
        self.objective, self.value, self.step = objective, value, step
        super().__init__(f"pruned at step {step}: {objective}={value:.4f}")
