"""One writer per run dir (lmexp/training/run_lock.py): the lock, its holder record, and how it ends.

The fast tests play "another process" with a second open file description of the lock file in this
process: flock locks belong to open file descriptions, so it conflicts exactly as another process does.
The slow ones use real processes and kill them for real.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lmexp.training import run_lock
from lmexp.training.run_lock import LOCK_NAME, RunDirBusy, acquire, holder_of, holding, release
from tests.conftest import REPO


def _foreign_holder(run_dir: Path, record: dict) -> int:
    """Hold ``run_dir`` through a descriptor of our own, as another process would; returns it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(record).encode())
    return fd


RECORD = {"pid": 4242, "host": "node7", "started": "2026-01-02T03:04:05+00:00", "command": "python -m x"}


def test_a_held_dir_is_refused_naming_the_holder(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "PROBE_GRACE_S", 0.1)
    fd = _foreign_holder(tmp_path / "run", RECORD)
    try:
        with pytest.raises(RunDirBusy) as info:
            acquire(tmp_path / "run")
        message = str(info.value)
        assert "\n" not in message and str(tmp_path / "run") in message
        assert "pid 4242 on node7, started 2026-01-02T03:04:05+00:00" in message
        assert "hydra.run.dir" in message  # what to do
        assert holder_of(tmp_path / "run").pid == 4242
    finally:
        os.close(fd)  # the "other process" ends: the kernel drops its lock
    assert holder_of(tmp_path / "run") is None
    with holding(tmp_path / "run"):
        assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_the_lock_is_reentrant_in_one_process_and_released_by_the_last_release(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "PROBE_GRACE_S", 0.1)
    run_dir = tmp_path / "run"
    with holding(run_dir):
        with holding(run_dir / ".." / "run"):  # the same dir, spelt differently
            pass
        other = os.open(run_dir / LOCK_NAME, os.O_RDONLY)
        with pytest.raises(BlockingIOError):  # still held after the inner release
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(other)
    assert (run_dir / LOCK_NAME).read_text() == ""  # no record without a holder
    fd = _foreign_holder(run_dir, RECORD)  # free: anyone can take it now
    os.close(fd)


def test_ranks_other_than_zero_never_take_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "PROBE_GRACE_S", 0.1)
    fd = _foreign_holder(tmp_path / "run", RECORD)  # rank 0 of the job
    monkeypatch.setenv("RANK", "1")
    try:
        with holding(tmp_path / "run"):  # rank 1 runs under it
            pass
    finally:
        os.close(fd)


def test_a_record_being_written_still_gives_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "PROBE_GRACE_S", 0.1)
    fd = _foreign_holder(tmp_path / "run", {})
    os.ftruncate(fd, 0)  # the holder has the lock and has not written its record yet
    try:
        with pytest.raises(RunDirBusy, match="in use by another lmexp run .a process that left no record."):
            acquire(tmp_path / "run")
    finally:
        os.close(fd)


HOLD = """
import os, sys, time
from lmexp.training.run_lock import acquire
acquire(sys.argv[1])
if len(sys.argv) > 2:  # a forked child (as a DataLoader worker is) that outlives its parent
    child = os.fork()
    if child == 0:
        time.sleep(60)
        os._exit(0)
    print("child", child, flush=True)
print("ready", flush=True)
time.sleep(60)
"""


def _hold_in_process(run_dir: Path, *args: str, **env: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir), *args],
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = []
    while not lines or lines[-1] != "ready":
        lines.append(process.stdout.readline().strip())
        assert lines[-1] or process.poll() is None, lines
    process.lines = lines
    return process


@pytest.mark.slow
def test_a_holder_killed_with_sigkill_frees_the_dir_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "PROBE_GRACE_S", 0.1)
    holder = _hold_in_process(tmp_path / "run")
    with pytest.raises(RunDirBusy, match=f"pid {holder.pid} on "):
        acquire(tmp_path / "run")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with holding(tmp_path / "run"):  # no stale lock, nothing to clean up
        assert holder_of(tmp_path / "run") is None


@pytest.mark.slow
def test_a_forked_child_does_not_keep_its_dead_parents_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "PROBE_GRACE_S", 0.1)
    holder = _hold_in_process(tmp_path / "run", "fork")
    child = int(holder.lines[0].split()[1])
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the child lives on, holding a copy of the parent's descriptors
        with holding(tmp_path / "run"):
            pass
    finally:
        os.kill(child, signal.SIGKILL)


@pytest.mark.slow
def test_a_requeued_slurm_job_waits_for_its_previous_instance(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "PROBE_GRACE_S", 0.1)
    holder = _hold_in_process(tmp_path / "run", SLURM_JOB_ID="7001")
    monkeypatch.setenv("SLURM_JOB_ID", "7001")  # this process is the same job, requeued
    killer = threading.Timer(1.0, holder.send_signal, (signal.SIGKILL,))
    killer.start()
    start = time.monotonic()
    acquire(tmp_path / "run")  # waits for the previous instance instead of failing after 0.1 s
    try:
        assert time.monotonic() - start >= 0.9
        assert holder.wait(timeout=10) == -signal.SIGKILL
    finally:
        release(tmp_path / "run")
    monkeypatch.setenv("SLURM_JOB_ID", "7002")  # another job is refused as usual
    other = _hold_in_process(tmp_path / "run", SLURM_JOB_ID="7001")
    try:
        with pytest.raises(RunDirBusy):
            acquire(tmp_path / "run")
    finally:
        other.kill()
        other.wait()
