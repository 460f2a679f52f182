"""What every ``python -m lmexp.<command>`` shares: the config dir and one-line errors.

Bad input must end in one line on stderr that names the culprit, a non-zero exit and no traceback.
Our own code raises :class:`lmexp.errors.UserError`; :func:`guarded` turns it into that line. Hydra
reports composition errors (unknown key, unknown config option) itself, over several lines, before
the task function runs; :func:`run_cli` holds stderr back until the task starts and folds such a
report into one line. ``HYDRA_FULL_ERROR=1`` turns all of this off.
"""

from __future__ import annotations

import functools
import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lmexp.errors import UserError, full_errors_requested

T = TypeVar("T")

_held_stderr: list[tuple[Any, io.StringIO]] = []


def config_dir() -> str:
    """Absolute path of the ``conf/`` directory next to the package."""
    return str(Path(__file__).resolve().parent.parent / "conf")


def _release_stderr() -> str:
    """Stop holding stderr back; return what was held."""
    if not _held_stderr:
        return ""
    real, buffer = _held_stderr.pop()
    sys.stderr = real
    return buffer.getvalue()


def fold_hydra_report(text: str) -> str:
    """One line from Hydra's multi-line error report (dropping its hints and search-path listing)."""
    parts: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("Set the environment variable HYDRA_FULL_ERROR"):
            continue
        if line.startswith("Config search path"):
            break
        line = line.rstrip(".") if line.endswith(".") and not line.endswith("..") else line
        if parts and parts[-1].endswith(":"):
            parts[-1] = f"{parts[-1]} {line}"
        elif parts and raw.startswith(("\t", "    ")) and ":" in parts[-1]:
            parts[-1] = f"{parts[-1]}, {line}"
        else:
            parts.append(line)
    return "; ".join(parts)


def guarded(task: Callable[..., T]) -> Callable[..., T]:
    """Wrap a Hydra task function: a UserError becomes ``error: <one line>`` and exit status 2."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        sys.stderr.write(_release_stderr())
        try:
            return task(*args, **kwargs)
        except UserError as error:
            if full_errors_requested():
                raise
            print(f"error: {error}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper


def run_cli(main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` function, folding Hydra's own composition errors into one line."""
    if full_errors_requested():
        main()
        return
    _held_stderr.append((sys.stderr, io.StringIO()))
    sys.stderr = _held_stderr[-1][1]
    try:
        main()
    except SystemExit as exit_:
        if not _held_stderr:  # the task ran and reported for itself
            raise
        held = _release_stderr()
        if exit_.code in (0, None) or not held.strip():
            sys.stderr.write(held)
        else:
            print(f"error: {fold_hydra_report(held)}", file=sys.stderr, flush=True)
        raise
    finally:
        sys.stderr.write(_release_stderr())
