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


def test_a_sweep_point_whose_dir_is_held_is_skipped_as_busy(tmp_path, monkeypatch, capsys):
    from omegaconf import OmegaConf

    from lmexp.sweeps.point import RUNNING, read_record, sweep_point, write_record
    from lmexp.sweeps.summary import SweepCallback
    from tests.sweeps.test_sweep_point import FakeTraining, point_config

    monkeypatch.setattr(run_lock, "PROBE_GRACE_S", 0.1)
    point_dir = tmp_path / "sweep" / "0"
    # The first sweep runs this point: its record says running and it holds the dir.
    write_record(point_dir, num=0, status=RUNNING, overrides=["optim.lr=0.01"], run_dir=str(point_dir))
    fd = _foreign_holder(point_dir, RECORD)
    training = FakeTraining()
    try:
        value = sweep_point(training)(point_config(point_dir, "optim.lr=0.01"))
        assert training.calls == 0 and value.startswith("busy: held by pid 4242 on node7")
        assert read_record(point_dir)["status"] == RUNNING  # its record is the running sweep's, untouched
        assert "busy: point 0 (sweep.name=unit optim.lr=0.01) is held by pid 4242" in capsys.readouterr().out
        callback = SweepCallback(report=False)
        callback.on_multirun_start(config=OmegaConf.create())
        callback.on_multirun_end(
            config=OmegaConf.create({"hydra": {"sweep": {"dir": str(point_dir.parent)}}})
        )
        out = capsys.readouterr().out
        assert "1 busy" in out and "held by pid 4242 on node7" in out
    finally:
        os.close(fd)
    value = sweep_point(training)(point_config(point_dir, "optim.lr=0.01"))  # free again: it runs
    assert training.calls == 1 and value == 1.5


@pytest.mark.slow
def test_a_second_run_on_a_held_dir_stops_at_once_through_the_cli(tmp_path, cli):
    run_dir = tmp_path / "same"
    holder = _hold_in_process(run_dir)  # the first run, still going
    try:
        result = cli("lmexp.train", "debug=fast", f"hydra.run.dir={run_dir}", timeout=120, forked=True)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(
        f"error: run dir {run_dir} is in use by another lmexp run (pid {holder.pid} on "
    )
    assert "hydra.run.dir" in lines[0]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        LOCK_NAME
    ]  # no .hydra/, log or checkpoints of its own


@pytest.mark.slow
def test_a_sweep_rerun_skips_the_points_still_held_and_says_so(tmp_path, cache_dir):
    from lmexp.sweeps.point import RUNNING, write_record
    from tests.sweeps.sweep_helpers import lmexp_env, run_lmexp, sweep_args

    sweep_dir = tmp_path / "out" / "multirun" / "held"
    holders = []
    for num, lr in enumerate(("0.01", "0.02")):  # the first sweep still runs both points
        point_dir = sweep_dir / str(num)
        write_record(point_dir, num=num, status=RUNNING, overrides=[f"optim.lr={lr}"], run_dir=str(point_dir))
        holders.append(_hold_in_process(point_dir))
    try:
        env = lmexp_env(cache_dir, tmp_path / "home")
        args = sweep_args(tmp_path / "out", "held", "sweep.report=false", "optim.lr=0.01,0.02")
        result = run_lmexp("train", *args, cwd=tmp_path, env=env, timeout=120)
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
    assert result.returncode == 0, result.stderr
    busy = [line for line in result.stdout.splitlines() if line.startswith("busy: point ")]
    assert len(busy) == 2, result.stdout
    assert (
        busy[0].startswith("busy: point 0 (")
        and f"optim.lr=0.01) is held by pid {holders[0].pid} on " in busy[0]
    )
    assert (
        busy[1].startswith("busy: point 1 (")
        and f"optim.lr=0.02) is held by pid {holders[1].pid} on " in busy[1]
    )
    assert "2 busy" in result.stdout and "Traceback" not in result.stderr
    assert not (sweep_dir / "0" / "checkpoints").exists()
