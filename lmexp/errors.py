"""User-facing errors: bad input becomes one clear line, never a traceback.

Code anywhere in lmexp raises :class:`UserError` (or a subclass) for problems the user can fix: a bad
config value, a missing file, a corrupt checkpoint. The entry points catch it, print one line that
names the culprit, and exit non-zero. ``HYDRA_FULL_ERROR=1`` re-raises with the full traceback.
"""

from __future__ import annotations

import errno
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


class StorageError(UserError):
    """A file could not be written: the disk is full, the file is over the size limit, or the place is
    read-only. Writers that raise it leave the previous version of the file as it was."""

    def __init__(
        self, path: str | Path, error: OSError, kept_whole: bool = True, action: str = "write"
    ) -> None:
        """``kept_whole``: the write went through a temporary file (lmexp's writers), so the previous
        version is whole; ``action``: ``access`` for a failure met elsewhere (a read or a write)."""
        self.path, self.errno = Path(path), error.errno
        cause = STORAGE_CAUSES.get(error.errno or 0, error.strerror or type(error).__name__)
        kept = "; the previous version of the file is unchanged" if kept_whole else ""
        super().__init__(f"cannot {action} {path}: {cause}{kept}")

    def __reduce__(self) -> tuple:  # picklable, so that it crosses from the data engine's worker processes
        return (StorageError, (self.path, OSError(self.errno, os.strerror(self.errno or 0))))


# Why a write fails, for the errors lmexp turns into one line (:func:`is_storage_failure`), with what to do.
STORAGE_CAUSES = {
    errno.ENOSPC: "no space left on the device (ENOSPC); free some space and run again",
    errno.EDQUOT: "the disk quota is used up (EDQUOT); free some space and run again",
    errno.EFBIG: "the file would exceed the file-size limit (EFBIG; see `ulimit -f`); raise it and run again",
    errno.EACCES: "permission denied (EACCES); make the directory writable or write elsewhere",
    errno.EPERM: "operation not permitted (EPERM); make the directory writable or write elsewhere",
    errno.EROFS: "the file system is read-only (EROFS); write elsewhere",
}


def is_storage_failure(error: BaseException) -> bool:
    """Whether ``error`` is a write that failed for lack of space, size limit or permission."""
    return isinstance(error, OSError) and error.errno in STORAGE_CAUSES


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
