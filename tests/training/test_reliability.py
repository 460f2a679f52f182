"""Losing nothing: kill -9 and resume, preemption signals, damaged checkpoints, NaN, shared caches, secrets.

The crash tests drive the real CLI in a subprocess and kill it for real, at whatever step it has reached
when its first checkpoint appears; a resumed run must end at the weights of a run never stopped.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lmexp.errors import CheckpointError
from lmexp.train import train
from lmexp.training.guards import NonFiniteLossError
from tests.conftest import REPO, CrashAtStep, wandb_records

# Long enough to be caught mid-run, short enough for the suite: the epoch is much longer than the run,
# so every stop lands mid-epoch and the data position has to be restored. Dropout on, so the random
# state has to be restored too.
RUN = [
    "debug=fast",
    "logger=[csv,wandb]",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.max_steps=120",
    "trainer.val_check_interval=40",
    "model.dropout=0.1",
]


def _env(cache_dir: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "LMEXP_CACHE_DIR": str(cache_dir), **extra}


def _start(run_dir: Path, cache_dir: Path, *overrides: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lmexp.train", *RUN, f"hydra.run.dir={run_dir}", *overrides],
        cwd=run_dir.parent,
        env=_env(cache_dir, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, which a scheduler's kill takes down whole
    )


def _run(run_dir: Path, cache_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    process = _start(run_dir, cache_dir, *overrides)
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def _step(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]


def _csv_steps(run_dir: Path, key: str) -> list[int]:
    return [step for step, _ in _csv_values(run_dir, key)]


def _csv_values(run_dir: Path, key: str) -> list[tuple[int, float]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        return [(int(float(row["step"])), float(row[key])) for row in csv.DictReader(handle) if row.get(key)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """The run dir of the same run never stopped."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = _run(run_dir, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _assert_same_result(run_dir: Path, reference: Path) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    expected = json.loads((reference / "metrics.json").read_text())
    assert metrics["perf/global_step"] == expected["perf/global_step"]
    assert metrics["val/loss"] == pytest.approx(expected["val/loss"], abs=1e-6)
    resumed = _weights(run_dir / "checkpoints" / "last.ckpt")
    uninterrupted = _weights(reference / "checkpoints" / "last.ckpt")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=1e-6, msg=name)
    # The CSV log continues: every training step logged once, as in the run never stopped.
    assert _csv_steps(run_dir, "train/loss") == _csv_steps(reference, "train/loss")


@pytest.mark.slow
def test_kill9_mid_epoch_then_resume_auto_matches_uninterrupted_run(tmp_path, cache_dir, reference):
    run_dir = tmp_path / "run"
    process = _start(run_dir, cache_dir, "callbacks.checkpoint.every_n_train_steps=7")
    _wait_for(run_dir / "checkpoints" / "last.ckpt", process)
    time.sleep(0.5)  # somewhere after the first checkpoint, maybe inside the next write
    os.killpg(process.pid, signal.SIGKILL)  # the job and its helpers (W&B's service), as SLURM does
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists()

    resumed = _run(run_dir, cache_dir, "callbacks.checkpoint.every_n_train_steps=7", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume=auto: continuing from" in resumed.stdout + resumed.stderr
    _assert_same_result(run_dir, reference)
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    # The same W&B run continues: two offline run dirs (one per process), one run id.
    run_ids = {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2 and len(run_ids) == 1


@pytest.mark.slow
def test_kill9_between_checkpoint_and_log_loses_no_logged_step(tmp_path, cache_dir, reference):
    """The window the timed kill above hits only sometimes: step 14's checkpoint on disk, its log row not."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    kill = ["+callbacks.kill._target_=tests.conftest.KillAfterCheckpoint", "+callbacks.kill.step=14"]
    every_7 = "callbacks.checkpoint.every_n_train_steps=7"  # before the first validation (step 40), too
    process = _start(run_dir, cache_dir, every_7, *kill, PYTHONPATH=str(REPO))
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == -signal.SIGKILL, stderr[-3000:]
    assert _step(run_dir / "checkpoints" / "last.ckpt") == 14
    assert 13 not in _csv_steps(run_dir, "train/loss")  # the row of the checkpoint's last step never got out

    resumed = _run(run_dir, cache_dir, every_7, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_result(run_dir, reference)
    # W&B never got step 13's row either: the resumed run logs it (its own history starts at step 14).
    second = sorted((run_dir / "wandb").glob("offline-run-*"))[-1]
    history = [r["history"]["item"] for r in wandb_records(second) if r.get("type") == "history"]
    assert any(row.get("trainer/global_step") == 13 and "train/loss" in row for row in history)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_preemption_signal_checkpoints_at_the_step_and_resumes(tmp_path, cache_dir, reference, signum):
    run_dir = tmp_path / "run"
    # No periodic checkpoint before the signal: the one on disk afterwards is the one the signal wrote.
    process = _start(run_dir, cache_dir, "callbacks.checkpoint.every_n_train_steps=100000")
    _wait_for(run_dir / "csv" / "metrics.csv", process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 143, stderr[-3000:]
    name = signal.Signals(signum).name
    line = next(line for line in stderr.splitlines() if line.startswith("stopped: "))
    last = run_dir / "checkpoints" / "last.ckpt"
    assert f"stopped by {name} at step {_step(last)}" in line and str(last) in line
    assert 0 < _step(last) < 120
    assert "Traceback" not in stderr
    assert not (run_dir / "metrics.json").exists()

    if signum == signal.SIGTERM:  # the resumed run's exactness; SIGUSR1 takes the same path from here
        resumed = _run(run_dir, cache_dir, "callbacks.checkpoint.every_n_train_steps=100000")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        _assert_same_result(run_dir, reference)


@pytest.mark.slow
def test_damaged_last_checkpoint_falls_back_to_the_newest_good_one(config, tmp_path):
    common = ["trainer.max_steps=16", "trainer.val_check_interval=4", "model.dropout=0.1"]
    reference = train(config(*common, run_dir=tmp_path / "ref"))
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(*common, run_dir=run_dir), extra_callbacks=[CrashAtStep(10)])
    checkpoints = run_dir / "checkpoints"
    last = checkpoints / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a write cut short
    good = [p for p in checkpoints.glob("best-step*.ckpt")]
    assert good

    resumed = train(config(*common, "resume=auto", run_dir=run_dir))
    assert resumed["val/loss"] == pytest.approx(reference["val/loss"], abs=1e-6)
    assert _step(last) == 16  # rewritten, whole

    # Every checkpoint damaged: one clear line, not a silent fresh start.
    for path in checkpoints.glob("*.ckpt"):
        path.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="resume=auto: no readable checkpoint"):
        train(config(*common, "resume=auto", run_dir=run_dir))


@pytest.mark.slow
def test_resume_inside_a_logging_window_logs_the_same_train_rows(config, tmp_path):
    # Train metrics are logged per window of 5 steps; the checkpoint of step 7 falls inside the window of
    # steps 5-9, whose row must still average all five of them after the resume.
    common = [
        "trainer.max_steps=15",
        "trainer.log_every_n_steps=5",
        "callbacks.checkpoint.every_n_train_steps=7",
        "model.dropout=0.1",
    ]
    reference = tmp_path / "ref"
    train(config(*common, run_dir=reference))
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(*common, run_dir=run_dir), extra_callbacks=[CrashAtStep(9)])
    assert _step(run_dir / "checkpoints" / "last.ckpt") == 7

    train(config(*common, "resume=auto", run_dir=run_dir))
    resumed, expected = _csv_values(run_dir, "train/loss"), _csv_values(reference, "train/loss")
    assert [step for step, _ in resumed] == [step for step, _ in expected] == [4, 9, 14]
    assert [value for _, value in resumed] == pytest.approx([value for _, value in expected], abs=1e-6)


@pytest.mark.slow
def test_last_checkpoint_keeps_its_schedule_before_the_first_validation(config, tmp_path):
    # Validation every 40 steps, checkpoints every 3: val/loss does not exist before step 40, and
    # last.ckpt must not wait for it (Lightning's ModelCheckpoint alone postpones it until then).
    common = [
        "trainer.max_steps=8",
        "trainer.val_check_interval=40",
        "callbacks.checkpoint.every_n_train_steps=3",
    ]
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(*common, run_dir=run_dir), extra_callbacks=[CrashAtStep(7)])
    assert _step(run_dir / "checkpoints" / "last.ckpt") == 6

    # Finished: last.ckpt holds the final step, rewritten in place (no last-v1.ckpt beside it).
    train(config(*common, "resume=auto", run_dir=run_dir))
    assert _step(run_dir / "checkpoints" / "last.ckpt") == 8
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("last*")) == ["last.ckpt"]


@pytest.mark.slow
def test_resume_never_starts_afresh_in_a_run_dir_with_checkpoints(config, tmp_path):
    first = train(config("trainer.max_steps=6", run_dir=tmp_path / "run"))
    again = train(config("trainer.max_steps=6", "resume=never", run_dir=tmp_path / "run"))
    assert again["val/loss"] == pytest.approx(first["val/loss"], abs=1e-6)  # same seed, from scratch


class PoisonWeights(Callback):
    """Sets one weight matrix to NaN before the batch of ``step``: every later loss is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.model.parameters()).fill_(float("nan"))


class PoisonOutputs(Callback):
    """Makes the model's loss NaN for the batches of ``steps`` only (the weights stay healthy)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps

    def on_fit_start(self, trainer, pl_module) -> None:
        def hook(module, inputs, output):  # output: the HeadLoss of model(input_ids, labels=...)
            if module.training and trainer.global_step in self.steps:
                return output._replace(nll_sum=output.nll_sum * float("nan"))
            return output

        pl_module.model.register_forward_hook(hook)


@pytest.mark.slow
def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(config, tmp_path):
    run_dir = tmp_path / "run"
    cfg = config("trainer.max_steps=20", "callbacks.checkpoint.every_n_train_steps=3", run_dir=run_dir)
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at step 7 .*last good checkpoint"):
        train(cfg, extra_callbacks=[PoisonWeights(7)])
    last = run_dir / "checkpoints" / "last.ckpt"
    assert _step(last) == 6
    assert all(torch.isfinite(t).all() for t in _weights(last).values())
    assert not (run_dir / "metrics.json").exists()


@pytest.mark.slow
def test_nonfinite_check_between_logging_intervals_still_guards_every_checkpoint(config, tmp_path):
    # Logging every 50 steps: the record of step 7 is first read when the step-9 checkpoint is about to
    # be written, which then never is; the message still names step 7.
    run_dir = tmp_path / "run"
    cfg = config(
        "trainer.max_steps=20",
        "trainer.log_every_n_steps=50",
        "callbacks.checkpoint.every_n_train_steps=3",
        run_dir=run_dir,
    )
    clock = StepCounter()
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at step 7 "):
        train(cfg, extra_callbacks=[PoisonWeights(7), clock])
    assert clock.last_step == 8  # step 8's batch ran; the checkpoint due after it (step 9) stopped the run
    last = run_dir / "checkpoints" / "last.ckpt"
    assert _step(last) == 6
    assert all(torch.isfinite(t).all() for t in _weights(last).values())
    assert not (run_dir / "metrics.json").exists()


class StepCounter(Callback):
    def __init__(self) -> None:
        self.last_step = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.last_step = trainer.global_step


@pytest.mark.slow
def test_skip_nonfinite_skips_and_counts_the_bad_batches(config, tmp_path):
    cfg = config("trainer.max_steps=12", "trainer.skip_nonfinite=true", run_dir=tmp_path / "run")
    metrics = train(cfg, extra_callbacks=[PoisonOutputs({4, 9})])
    assert metrics["train/skipped_nonfinite"] == 2
    assert metrics["perf/global_step"] == 12
    weights = _weights(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))


@pytest.mark.slow
def test_nonfinite_loss_from_the_cli_is_one_line(cli):
    # lr 1e6 blows the weights up within a few steps; the run stops at the first non-finite loss.
    overrides = ["trainer.max_steps=60", "optim.lr=1e6", "trainer.gradient_clip_val=null"]
    result = cli("lmexp.train", *RUN[:4], *overrides)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: training loss is") and "at step" in lines[0]
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------- shared caches
PREPARE = """
import hashlib, json, logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from lmexp.data.context import DataContext
from lmexp.data.datamodule import TextDataConfig
from lmexp.data.tokenizer import TokenizerConfig
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.01)
config = TextDataConfig(n_documents=300, block_size=32, batch_size=4)
data = config.build(DataContext(TokenizerConfig(vocab_size=400), Path(sys.argv[1])))
data.prepare()
shards = [p for source in data.corpus.sources.values() for p in sorted(source.directory.glob("u*.bin"))]
files = [data.tokenizer.path, *shards]
digest = hashlib.sha256(b"".join(Path(f).read_bytes() for f in files)).hexdigest()
print("RESULT", json.dumps({"digest": digest, "ids": data.tokenizer.encode(["the cat sat on the mat"])}))
"""


@pytest.mark.slow
def test_four_processes_on_a_cold_cache_build_once_and_agree(tmp_path):
    cache, go = tmp_path / "cache", tmp_path / "go"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", PREPARE, str(cache), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    time.sleep(3)  # let all four import and wait at the starting line
    go.touch()
    outputs = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err[-2000:] for _, err in outputs]
    log = "".join(out for out, _ in outputs)
    assert log.count("built corpus") == 1
    assert log.count("built tokenizer") == 1
    from lmexp.data.prepare import read_builds_log

    (builds_log,) = cache.rglob("builds.log")
    units = [build["unit"] for build in read_builds_log(builds_log.parent)]
    assert sorted(units) == sorted(set(units))  # each unit of token shards built once, by one of the four
    lines = [line for out, _ in outputs for line in out.splitlines() if line.startswith("RESULT ")]
    results = [json.loads(line.removeprefix("RESULT ")) for line in lines]
    assert len(results) == 4 and all(r == results[0] for r in results)
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".build-")]


# -------------------------------------------------------------------------------------------- secrets
@pytest.mark.slow
def test_credentials_never_reach_the_run_files(cli, tmp_path):
    secrets = {"WANDB_API_KEY": "fake-wandb-key-0123456789abcdef", "HF_TOKEN": "hf_fakeTokenValue9876543210"}
    # A config that pulls a token from the environment, as a user might for a private dataset.
    result = cli(
        "lmexp.train",
        *RUN[:4],
        "trainer.max_steps=4",
        "+data_token=${oc.env:HF_TOKEN}",
        "logger.wandb.mode=offline",
        env=secrets,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = list((tmp_path / "outputs" / "runs").glob("*/*"))
    assert len(run_dirs) == 1
    files = [p for p in run_dirs[0].rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in files) and any(p.suffix == ".wandb" for p in files)
    for path in files:
        content = path.read_bytes()
        for name, value in secrets.items():
            assert value.encode() not in content, f"{name} leaked into {path}"
    for text in (result.stdout, result.stderr):
        assert not any(value in text for value in secrets.values())
