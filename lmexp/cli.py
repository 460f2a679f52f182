"""What every ``python -m lmexp.<command>`` shares: one-line errors, and how relaunched ranks start.

Bad input must end in one line on stderr that names the culprit, a non-zero exit and no traceback.
Our own code raises :class:`lmexp.errors.UserError`; :func:`guarded` (Hydra commands) and
:func:`run_command` (plain commands: plan, report, bench) turn it into that line (through
:func:`exit_on_error`, which also catches any write that failed for lack of space or permission). Hydra
reports composition errors (unknown key, unknown config option, a value its grammar cannot read) itself, over
several lines, before the task function runs; :func:`run_cli` holds stderr back until the task starts and
folds such a report into one line, naming the override its grammar could not read. ``HYDRA_FULL_ERROR=1``
turns all of this off.

Distributed ranks: when Lightning starts ranks 1..n-1 of a job (lmexp.training.distributed), each
runs ``python -m <entry>`` with the job's resolved config in ``LMEXP_RANK_CONFIG``; :func:`run_cli` then
skips Hydra altogether and runs the task function on that config, so a rank never re-runs a sweep and
never writes Hydra's outputs. Ranks started by the cluster (``srun``, torchrun) do run Hydra; for ranks
other than 0, :func:`run_cli` turns off Hydra's ``.hydra/`` output and :func:`guarded` its log file.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from lmexp.errors import StorageError, UserError, full_errors_requested, is_storage_failure

T = TypeVar("T")

_held_stderr: list[tuple[Any, io.StringIO]] = []

RANK_CONFIG_ENV = "LMEXP_RANK_CONFIG"  # the resolved job config (YAML) of a relaunched rank
DEFAULT_ENTRY = "lmexp.train"
_entry_module: list[str] = []  # the module run with ``python -m``, recorded by run_cli


def _release_stderr() -> str:
    """Stop holding stderr back; return what was held."""
    if not _held_stderr:
        return ""
    real, buffer = _held_stderr.pop()
    sys.stderr = real
    return buffer.getvalue()


QUOTING_HINT = (
    "Hydra's override grammar cannot read this value unquoted: quote it, e.g. "
    "'prompt=\"大语言模型\"' (single quotes for the shell, double quotes for Hydra)"
)
BRACKETS_HINT = "a list is written [a,b], a mapping {k:v}; quote values with spaces or other symbols"
_GRAMMAR_MARK = "override_grammar"  # Hydra ends every override parse error with a link to its grammar


# Characters with a meaning in Hydra's override grammar (lists, dicts, sweeps, interpolations, quoting):
# a value with any of them is left for Hydra to read.
_HYDRA_SYNTAX = set("'\"\\,[]{}()$")
_OVERRIDE = re.compile(r"^([+~]{0,2}[A-Za-z_][\w.@/-]*)=(.*)$", re.DOTALL)


def quote_non_ascii(argv: list[str]) -> list[str]:
    """``argv`` with every ``key=value`` override whose value has non-ASCII characters (and none of
    Hydra's syntax) double-quoted: Hydra's lexer reads unquoted values as ASCII only, so
    ``prompt=大语言模型`` or ``data.path=语料.txt`` would otherwise fail. Everything else is unchanged."""
    quoted = []
    for argument in argv:
        match = _OVERRIDE.match(argument)
        value = match.group(2) if match else ""
        if match and not value.isascii() and not (_HYDRA_SYNTAX & set(value)):
            argument = f'{match.group(1)}="{value}"'
        quoted.append(argument)
    return quoted


def fold_hydra_report(text: str, overrides: Sequence[str] = ()) -> str:
    """One line from Hydra's multi-line error report (dropping its hints and search-path listing).

    ``overrides``: the command line's overrides, to name the one Hydra's grammar could not read (its own
    message quotes only the unreadable fragment).
    """
    if _GRAMMAR_MARK in text or "LexerNoViableAltException" in text or "token recognition error" in text:
        return _grammar_error(text, overrides)
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


def _grammar_error(text: str, overrides: Sequence[str]) -> str:
    """The override Hydra's grammar could not read, its key, why, and how to write it."""
    from lmexp.config.overrides import key_of

    culprit = (
        unreadable_override(overrides)
        or next((line.split("'", 2)[1] for line in text.splitlines() if "override '" in line), "")
        or next(  # Hydra 1.3 also reports "LexerNoViableAltException: <the override>"
            (
                line.split("LexerNoViableAltException:", 1)[1].strip()
                for line in text.splitlines()
                if "LexerNoViableAltException:" in line
            ),
            "",
        )
    )
    if not culprit:
        return QUOTING_HINT
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[0].split(": ", 1)[-1] if lines else ""
    if "LexerNoViableAltException" in text or "token recognition error" in text or not culprit.isascii():
        key, _, value = culprit.partition("=")
        example = f"'{key}=\"{value}\"'" if value and '"' not in value else "'prompt=\"大语言模型\"'"
        reason, hint = (
            "a character the grammar does not take unquoted",
            QUOTING_HINT.replace("'prompt=\"大语言模型\"'", example),
        )
    else:
        hint = BRACKETS_HINT
    return f"cannot read the override {culprit!r} (key {key_of(culprit)}): {reason}; {hint}"


def unreadable_override(overrides: Sequence[str]) -> str | None:
    """The first of ``overrides`` that Hydra's override grammar rejects (flags and their values skipped)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for override in overrides:
        if override.startswith("-") or ("=" not in override and not override.startswith("~")):
            continue
        try:
            parser.parse_override(override)
        except HydraException:
            return override
    return None


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """A UserError in the body becomes ``error: <one line>`` on stderr and exit status 2; so does a write
    that failed for lack of space, a size limit or permission, wherever it was made."""
    try:
        yield
    except UserError as error:
        _exit_with(error)
    except OSError as error:
        if not is_storage_failure(error):
            raise
        _exit_with(
            StorageError(error.filename or "a file", error, kept_whole=False, action="access"), cause=error
        )


def _exit_with(error: UserError, cause: BaseException | None = None) -> None:
    if full_errors_requested():
        if cause is not None:
            raise cause
        raise error
    sys.stderr.write(_release_stderr())  # errors before the task function: Hydra's stderr was held back
    print(f"error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


def guarded(task: Callable[..., T]) -> Callable[..., T]:
    """Wrap a Hydra task function: a UserError becomes ``error: <one line>`` and exit status 2."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        sys.stderr.write(_release_stderr())
        if external_rank() > 0:
            _drop_log_files()
            _not_rank_zero(external_rank())
        with exit_on_error():
            return task(*args, **kwargs)

    return wrapper


def run_command(main: Callable[[], Any]) -> None:
    """Run a plain (non-Hydra) command: a UserError becomes ``error: <one line>`` and exit status 2; a
    returned int is the exit status."""
    with exit_on_error():
        status = main()
    raise SystemExit(status if isinstance(status, int) else 0)


def run_cli(main: Callable[..., Any]) -> None:
    """Run a ``@hydra.main`` function, folding Hydra's own composition errors into one line.

    In a rank relaunched by lmexp (lmexp.training.distributed), run it on the job config it was given.
    """
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    _entry_module[:] = [spec.name] if spec is not None else []
    if os.environ.get(RANK_CONFIG_ENV):
        _run_relaunched_rank(main)
        return
    sys.argv[1:] = quote_non_ascii(sys.argv[1:])
    if external_rank() > 0 and "hydra.output_subdir=null" not in sys.argv:
        sys.argv.append("hydra.output_subdir=null")  # rank 0 writes .hydra/
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
            print(f"error: {fold_hydra_report(held, sys.argv[1:])}", file=sys.stderr, flush=True)
        raise
    finally:
        sys.stderr.write(_release_stderr())


# ----------------------------------------------------------------------------------------- ranks
def external_rank() -> int:
    """This process's global rank when a cluster started it (srun, torchrun); 0 otherwise.

    A process started per node with Lightning's own variables (``NODE_RANK``, optionally ``LOCAL_RANK``)
    gets ``NODE_RANK + LOCAL_RANK``: the processes per node are not known before the config, so this is
    not its global rank, but it is 0 exactly for global rank 0, which is what callers ask.
    """
    if os.environ.get(RANK_CONFIG_ENV):
        return int(os.environ.get("LOCAL_RANK", "0"))
    for name in ("RANK", "SLURM_PROCID"):
        if name == "SLURM_PROCID" and int(os.environ.get("SLURM_NTASKS", "1")) < 2:
            continue  # a one-task SLURM job (e.g. sbatch around a single process) has no other ranks
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    if os.environ.get("NODE_RANK", "").isdigit():
        local_rank = os.environ.get("LOCAL_RANK", "")
        return int(os.environ["NODE_RANK"]) + (int(local_rank) if local_rank.isdigit() else 0)
    return 0


def _not_rank_zero(rank: int) -> None:
    """Tell Lightning's ``rank_zero_only`` that this process is not rank 0 before its Trainer does.

    lmexp builds its loggers (W&B, CSV) before the Trainer, and Lightning's import-time guess reads
    RANK, LOCAL_RANK and SLURM_PROCID but not NODE_RANK: on node 1 of a NODE_RANK launch, they would
    log as rank 0. Lightning sets the exact rank when its strategy starts.
    """
    from lightning_utilities.core.rank_zero import rank_zero_only

    rank_zero_only.rank = rank


def _drop_log_files() -> None:
    """Stop writing to log files (Hydra's ``<job>.log``): only rank 0 writes the run's log."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()


def rank_process_command() -> list[str]:
    """The command line of a relaunched rank: the entry module of rank 0, with no arguments."""
    entry = _entry_module[0] if _entry_module else DEFAULT_ENTRY
    return [sys.executable, "-m", entry]


def rank_process_environment(job_config: Any) -> dict[str, str]:
    """Rank 0's environment plus the job's resolved config, for a relaunched rank."""
    from omegaconf import OmegaConf

    env = dict(os.environ)
    env[RANK_CONFIG_ENV] = OmegaConf.to_yaml(job_config, resolve=True)
    return env


def _run_relaunched_rank(main: Callable[..., Any]) -> None:
    """Run the task function of ``main`` (a ``@hydra.main`` function) on the config in the environment."""
    from omegaconf import OmegaConf

    logging.basicConfig(level=logging.WARNING, format="[rank %(process)d] %(levelname)s %(message)s")
    cfg = OmegaConf.create(os.environ[RANK_CONFIG_ENV])
    main(cfg)  # Hydra passes a given config straight to the task function: no parsing, no sweep
