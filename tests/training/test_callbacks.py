"""Early stopping and EMA as config entries: checked monitors, and an exact resume after kill -9 with both."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmexp.config.settings import load_settings
from lmexp.errors import ConfigError
from tests.conftest import REPO

AIDS = ["callbacks=[default,ema,early_stopping]", "callbacks.ema.decay=0.9"]


def test_monitor_must_be_a_metric_the_task_logs(config):
    cfg = config("callbacks=[default,early_stopping]", "callbacks.early_stopping.monitor=val/exact_match")
    with pytest.raises(ConfigError) as error:
        load_settings(cfg)
    message = str(error.value)
    assert "callbacks.early_stopping.monitor=val/exact_match: task=clm never logs it" in message
    assert "it logs val/loss, val/ppl, val/acc, val/bpw, train/loss" in message
    ok = config("callbacks=[default,early_stopping]", "callbacks.early_stopping.monitor=val/acc")
    assert load_settings(ok).callbacks["early_stopping"]["monitor"] == "val/acc"


def test_qa_metrics_can_be_monitored(config):
    paths = ["data.train_path=t.jsonl", "data.val_path=v.jsonl", "data.block_size=384"]
    cfg = config(
        "model=bert", "task=qa", "data=squad", *paths, *AIDS, "callbacks.early_stopping.monitor=val/f1"
    )
    settings = load_settings(cfg)
    assert settings.callbacks["ema"]["decay"] == 0.9


def test_ema_decay_is_checked(config):
    with pytest.raises(ConfigError, match=r"callbacks.ema.decay=1.5: expected a number between 0 and 1"):
        load_settings(config(*AIDS, "callbacks.ema.decay=1.5"))


# Dropout on, so the random state must be restored too. Validation every 4 steps, a checkpoint every 6, the
# kill right after step 6's: the early-stopping state then holds step 4's validation. (A kill right after a
# checkpoint written at a validation step, before that validation ran, resumes past it: its early-stopping
# state then differs from a run never stopped.)
RUN = [
    "debug=fast",
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.max_steps=12",
    "trainer.val_check_interval=4",
    "callbacks.checkpoint.every_n_train_steps=6",
    "callbacks.early_stopping.patience=100",
    "model.dropout=0.1",
    *AIDS,
]


def _train(run_dir: Path, cache_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMEXP_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "lmexp.train", *RUN, f"hydra.run.dir={run_dir}", *extra]
    return subprocess.run(
        command,
        cwd=run_dir.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
    )


@pytest.mark.slow
def test_ema_and_early_stopping_survive_kill9_and_resume(tmp_path, cache_dir):
    reference = tmp_path / "reference"
    assert _train(reference, cache_dir).returncode == 0

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    killed = _train(
        run_dir,
        cache_dir,
        "+callbacks.kill._target_=tests.conftest.KillAfterCheckpoint",
        "+callbacks.kill.step=6",
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = _train(run_dir, cache_dir, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    ours = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    theirs = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ours["global_step"] == theirs["global_step"] == 12
    # state_dict: the EMA weights (what eval, export and init_from load); current_model_state: the raw ones
    for key in ("state_dict", "current_model_state", "averaging_state"):
        assert ours[key].keys() == theirs[key].keys()
        for name in ours[key]:
            torch.testing.assert_close(ours[key][name], theirs[key][name], rtol=0, atol=1e-6, msg=name)
    name = "model.lm_head.weight"
    assert not torch.equal(ours["state_dict"][name], ours["current_model_state"][name])  # an average
    stopping = next(k for k in ours["callbacks"] if k.startswith("EarlyStopping"))
    assert ours["callbacks"][stopping] == theirs["callbacks"][stopping]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/loss"] == pytest.approx(
        json.loads((reference / "metrics.json").read_text())["val/loss"]
    )


@pytest.mark.slow
def test_early_stopping_on_an_unlogged_metric_is_one_line_from_the_cli(cli):
    result = cli(
        "lmexp.train",
        "callbacks=[default,early_stopping]",
        "callbacks.early_stopping.monitor=val/f1",
        forked=True,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        "error: callbacks.early_stopping.monitor=val/f1: task=clm never logs it; it logs val/loss, val/ppl, "
        "val/acc, val/bpw, train/loss"
    )
