"""One writer per run dir: an exclusive OS lock on ``<run dir>/run.lock`` for as long as a run uses the dir.

Two jobs writing one run dir (a sweep re-run while the first is still going, two SLURM jobs given the same
``hydra.run.dir``) would interleave checkpoints, CSV rows and W&B runs. So a training run takes
``fcntl.flock(LOCK_EX)`` on ``run.lock`` before it writes anything there, and keeps it until it ends:

* the kernel drops the lock when the process dies, however it dies (``kill -9``, a SLURM requeue), so a
  lock is never stale; the file's contents (pid, host, start time, command) only describe the holder;
* a second run finds the lock held and stops at once with :class:`RunDirBusy`, one line naming the dir and
  the holder; a sweep re-run skips such a point (``busy: point N ...``, lmexp/sweeps/point.py);
* the ranks of one job share it: rank 0 holds it, ranks 1..n-1 (started by lmexp, ``srun`` or torchrun)
  never ask for it (:func:`lmexp.cli.external_rank`);
* a requeued SLURM job whose previous instance is still shutting down waits up to
  :data:`REQUEUE_WAIT_S` seconds for it rather than failing (same ``SLURM_JOB_ID`` in the holder's record).

The lock is re-entrant within a process: the CLI takes it before Hydra writes ``.hydra/``
(:class:`RunDirLock`), :func:`lmexp.training.run.train` takes it again for callers that run in-process, a
sweep point takes it before its record. A forked child (a DataLoader worker) closes its copy of the
descriptor, so only the process that took the lock keeps it alive. ``flock`` also works on NFS (Linux
emulates it with byte-range locks).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from lmexp.errors import StorageError, UserError, is_storage_failure

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
PROBE_GRACE_S = 1.0  # a probe (holder_of) holds a shared lock for microseconds: retry this long first
REQUEUE_WAIT_S = 120.0  # how long a requeued SLURM job waits for its previous instance to exit
_POLL_S = 0.05


@dataclass
class Holder:
    """Who holds a run dir (what the holder wrote into ``run.lock``)."""

    pid: int
    """Process id of the holder."""
    host: str
    """Host name of the holder."""
    started: str
    """When it took the lock (local time, ISO 8601)."""
    command: str = ""
    """Its command line."""
    job: str | None = None
    """Its SLURM job (``<job id>`` or ``<array job id>_<task id>``), if any."""

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}"


class RunDirBusy(UserError):
    """Another process holds the run dir."""

    def __init__(self, run_dir: Path, holder: Holder | None) -> None:
        self.run_dir, self.holder = run_dir, holder
        who = holder.describe() if holder else "a process that left no record"
        stop = f"stop it (kill {holder.pid} on {holder.host})" if holder else "stop it"
        super().__init__(
            f"run dir {run_dir} is in use by another lmexp run ({who}); wait for it to end or {stop}, or "
            "give this run another hydra.run.dir"
        )


# Locks this process holds: lock file -> [descriptor, depth]
_held: dict[Path, list[int]] = {}


def _forget_in_child() -> None:
    """After a fork: close the child's copies of the lock descriptors, so that the lock lives exactly as long
    as the process that took it (closing a copy never releases a flock held through another copy)."""
    for fd, _ in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def slurm_job() -> str | None:
    """This process's SLURM job (array task included), or None outside SLURM."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def _lock_file(run_dir: str | Path) -> Path:
    return Path(run_dir).expanduser().resolve() / LOCK_NAME


def _takes_the_lock() -> bool:
    """Rank 0 of a job takes the lock; the job's other ranks run under it."""
    from lmexp.cli import external_rank

    return external_rank() == 0


def acquire(run_dir: str | Path) -> None:
    """Hold ``run_dir`` for this process (again, if it holds it already); :class:`RunDirBusy` if another
    process does. Creates the dir. Pair every call with :func:`release`."""
    run_dir = Path(run_dir).expanduser()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = _lock_file(run_dir)
        if path in _held:
            _held[path][1] += 1
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        if is_storage_failure(error):
            raise StorageError(error.filename or run_dir, error, kept_whole=False) from error
        raise
    try:
        if not _lock(fd, path, run_dir):
            _held[path] = [fd, 1]  # unsupported by the file system: go on unguarded, as before
            return
        from lmexp.training.secrets import redact

        command = redact(" ".join(getattr(sys, "orig_argv", sys.argv)))  # as typed, secrets masked
        record = Holder(os.getpid(), socket.gethostname(), _now(), command, slurm_job())
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(asdict(record)) + "\n").encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    _held[path] = [fd, 1]


def _lock(fd: int, path: Path, run_dir: Path) -> bool:
    """Take the exclusive lock on ``fd`` or raise :class:`RunDirBusy`; False when the file system cannot
    lock at all."""
    deadline = time.monotonic() + PROBE_GRACE_S
    waiting_for_previous_instance = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        except OSError as error:  # ENOLCK, EOPNOTSUPP: some FUSE and old network file systems
            log.warning("cannot lock %s (%s): nothing stops a second run in this dir", path, error.strerror)
            return False
        holder = read_holder(path)
        job = slurm_job()
        if not waiting_for_previous_instance and holder and job and holder.job == job:
            waiting_for_previous_instance = True  # a requeued job: its previous instance is still exiting
            log.warning(
                "%s is held by the previous instance of SLURM job %s; waiting for it to exit", path, job
            )
            deadline = time.monotonic() + REQUEUE_WAIT_S
        if time.monotonic() >= deadline:
            raise RunDirBusy(run_dir, holder)
        time.sleep(_POLL_S)


def release(run_dir: str | Path) -> None:
    """Undo one :func:`acquire`; the last one clears the record and drops the lock."""
    path = _lock_file(run_dir)
    entry = _held.get(path)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[path]
    fd = entry[0]
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)  # the record describes a holder only while there is one
    os.close(fd)  # closing the last descriptor drops the flock


@contextlib.contextmanager
def holding(run_dir: str | Path) -> Iterator[None]:
    """Hold ``run_dir`` for the body (a no-op on ranks other than 0, which run under rank 0's lock)."""
    if not _takes_the_lock():
        yield
        return
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)


def read_holder(path: Path) -> Holder | None:
    """The record in a lock file, or None when it is empty or unreadable (being written, or cleared)."""
    try:
        record: Any = json.loads(Path(path).read_text(encoding="utf-8"))
        return Holder(**{key: record[key] for key in Holder.__dataclass_fields__ if key in record})
    except (OSError, ValueError, TypeError, KeyError):
        return None


def holder_of(run_dir: str | Path) -> Holder | None:
    """Who holds ``run_dir`` now (None when nobody does, or this process does), without taking it.

    Probes with a shared lock for an instant; :func:`acquire` retries for :data:`PROBE_GRACE_S`, so a probe
    never makes a starting run give up.
    """
    path = _lock_file(run_dir)
    if path in _held or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_holder(path) or Holder(pid=0, host="unknown", started="unknown")
    except OSError:
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


class RunDirLock(Callback):
    """Hydra callback (``hydra.callbacks.run_lock`` in conf/train.yaml): a single run takes its run dir
    before Hydra writes ``.hydra/`` and the log there, so a second run on a held dir changes nothing in it.

    Sweep points take their dirs in :func:`lmexp.sweeps.point.run_point`, where a held one is skipped.
    """

    def __init__(self) -> None:
        self._run_dir: Path | None = None

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        from lmexp.cli import exit_on_error

        if not _takes_the_lock():
            return
        run_dir = Path(os.path.abspath(str(config.hydra.run.dir)))  # as Hydra's run_job places it
        with exit_on_error():
            acquire(run_dir)
        self._run_dir = run_dir

    def on_run_end(self, config: Any, **kwargs: Any) -> None:
        if self._run_dir is not None:
            release(self._run_dir)
            self._run_dir = None
