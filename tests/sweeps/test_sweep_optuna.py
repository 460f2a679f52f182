"""The Optuna sweep (sweeps/bert_optuna.yaml) end to end, 2 tiny trials, each told its point's objective."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.sweeps.sweep_helpers import records, run_lmexp, sweep_args

# The search space of sweeps/bert_optuna.yaml as written; only its length and the run size are cut. Two
# trials are enough to tell each trial's objective apart; CSV logging only, as nothing here reads W&B (each
# sweep point as its own W&B run is tests/sweeps/test_sweep_grid.py's, through the same sweep_point path).
TRIALS = (
    "+sweep=bert_optuna",
    "hydra.sweeper.n_trials=2",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "logger=csv",
)


@pytest.mark.slow  # 2 BERT trainings in one process
def test_an_optuna_sweep_receives_each_trials_objective(workdir: Path, env: dict[str, str]):
    import optuna

    result = run_lmexp("train", *sweep_args(workdir / "out", "optuna", *TRIALS), cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = workdir / "out" / "multirun" / "optuna"
    study = optuna.load_study(study_name="optuna", storage=f"sqlite:///{sweep_dir}/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2
    points = records(sweep_dir)
    for trial in study.trials:
        metrics = json.loads((sweep_dir / str(trial.number) / "metrics.json").read_text())
        assert trial.value == pytest.approx(metrics["val/loss"])
        assert points[trial.number]["objective"] == pytest.approx(metrics["val/loss"])
        overrides = points[trial.number]["overrides"]
        assert f"model.n_layer={trial.params['model.n_layer']}" in overrides
        assert f"model.n_embd={trial.params['model.n_embd']}" in overrides
    assert {p["status"] for p in points.values()} == {"finished"}
    best = json.loads((sweep_dir / "summary.json").read_text())["best"]
    assert study.best_trial.number == best
    assert "sweep: 2 finished" in result.stdout
