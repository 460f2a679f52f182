"""A pruning Optuna sweep end to end through the CLI: 7 tiny trials over a learning rate range whose top is
hopeless; those trials stop at their first validation, recorded as pruned everywhere, the best trial is the
one the unpruned search finds, a resumed sweep keeps them pruned; bad pruner input stops before any job."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import wandb_records
from tests.sweeps.sweep_helpers import records, run_lmexp, sweep_args

MAX_STEPS, VALIDATE_EVERY, N_TRIALS = 10, 5, 7
# TPE samples at random (seeded by `seed`) for its first n_startup_trials: the same 7 learning rates every
# time, whatever the pruner does. The median pruner judges from the 3rd trial on.
SEARCH = (
    "hydra/sweeper=tpe",
    f"hydra.sweeper.n_trials={N_TRIALS}",
    "hydra.sweeper.sampler.n_startup_trials=10",
    "optim.lr=tag(log,interval(0.001,30))",
    f"trainer.max_steps={MAX_STEPS}",
    f"trainer.val_check_interval={VALIDATE_EVERY}",
)
PRUNING = ("hydra.sweeper.pruner=median", "hydra.sweeper.median.n_startup_trials=2")


def load_study(sweep_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir}/optuna.db")


@pytest.fixture(scope="module")
def pruned_sweep(workdir: Path, env: dict[str, str]):
    """The pruning sweep, run once for the module: (the finished process, the sweep dir)."""
    args = sweep_args(workdir / "out", "pruned", *SEARCH, *PRUNING)
    result = run_lmexp("train", *args, cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, workdir / "out" / "multirun" / "pruned"


@pytest.mark.slow  # 7 tiny trainings in one process, 2 of them cut short: ~25 s on 2 idle cores
def test_hopeless_trials_are_pruned_at_their_first_validation_and_recorded_as_pruned(pruned_sweep):
    result, sweep_dir = pruned_sweep
    study = load_study(sweep_dir, "pruned")
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned and len(pruned) < N_TRIALS
    assert {t.state for t in study.trials} == {TrialState.COMPLETE, TrialState.PRUNED}
    points = records(sweep_dir)
    for trial in pruned:
        assert list(trial.intermediate_values) == [VALIDATE_EVERY]  # reported once, then stopped
        assert trial.params["optim.lr"] > 1.0  # only hopeless learning rates
        point = points[trial.number]
        assert (point["status"], point["pruned_at_step"], point["steps"]) == ("pruned", VALIDATE_EVERY, 5)
        assert point["objective"] == pytest.approx(trial.intermediate_values[VALIDATE_EVERY])
        assert not (sweep_dir / str(trial.number) / "metrics.json").exists()  # no final evaluation
        run = [r for r in point_wandb(sweep_dir / str(trial.number)) if r.get("type") in ("run", "summary")]
        assert "pruned" in json.dumps(run) and "sweep/pruned" in json.dumps(run)
    for trial in study.trials:
        if trial.state == TrialState.COMPLETE:
            assert points[trial.number]["status"] == "finished" and points[trial.number]["steps"] == MAX_STEPS
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["best"] == study.best_trial.number
    assert f"sweep: {N_TRIALS - len(pruned)} finished, {len(pruned)} pruned; best: point" in result.stdout
    report = (sweep_dir / "report.md").read_text()
    assert f"{len(pruned)} pruned" in report and f"pruned at step {VALIDATE_EVERY}: val/loss=" in report


def point_wandb(run_dir: Path) -> list[dict]:
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return wandb_records(runs[0])


@pytest.mark.slow  # the pruned trials' learning rates trained to the end: ~8 s
def test_the_best_trial_is_the_unpruned_searchs_best(pruned_sweep, workdir: Path, env: dict[str, str]):
    # Every trial is deterministic (same seed, same sampled learning rates), so the unpruned search equals
    # the finished trials plus the pruned ones trained to the end: only those are run here, as a grid.
    _, sweep_dir = pruned_sweep
    study = load_study(sweep_dir, "pruned")
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    lrs = ",".join(repr(t.params["optim.lr"]) for t in pruned)
    result = run_lmexp(
        "train", *sweep_args(workdir / "out", "unpruned", f"optim.lr={lrs}"), cwd=workdir, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    full = records(workdir / "out" / "multirun" / "unpruned")
    assert all(r["status"] == "finished" and r["steps"] == MAX_STEPS for r in full.values())
    assert min(r["objective"] for r in full.values()) > study.best_value
    steps_pruned = sum(r["steps"] for r in records(sweep_dir).values())
    steps_unpruned = N_TRIALS * MAX_STEPS  # without a pruner nothing stops a trial before max_steps
    assert steps_pruned == steps_unpruned - len(pruned) * (MAX_STEPS - VALIDATE_EVERY)


@pytest.mark.slow  # one more trial: ~5 s
def test_a_resumed_sweep_keeps_its_pruned_trials_pruned(pruned_sweep, workdir: Path, env: dict[str, str]):
    _, sweep_dir = pruned_sweep
    before = {t.number: t.state for t in load_study(sweep_dir, "pruned").trials}
    more = [*SEARCH, *PRUNING, f"hydra.sweeper.n_trials={N_TRIALS + 1}"]
    result = run_lmexp("train", *sweep_args(workdir / "out", "pruned", *more), cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    after = load_study(sweep_dir, "pruned").trials
    assert {t.number: t.state for t in after[:N_TRIALS]} == before
    assert len(after) == N_TRIALS + 1 and after[-1].state.is_finished()
    assert all(
        r["status"] == "pruned" for n, r in records(sweep_dir).items() if before.get(n) == TrialState.PRUNED
    )


@pytest.mark.slow  # a CLI start each: ~3 s
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ("hydra.sweeper.pruner=asha",),
            "error: hydra.sweeper.pruner='asha': expected one of Optuna's pruners median (MedianPruner), "
            "hyperband (HyperbandPruner), none (NopPruner)",
        ),
        (
            ("hydra.sweeper.pruner=median", "hydra.sweeper.storage=null"),
            "error: hydra.sweeper.pruner=median needs hydra.sweeper.storage",
        ),
        (
            ("hydra.sweeper.pruner=hyperband", "objective=test/loss"),
            "error: objective=test/loss: hydra.sweeper.pruner=hyperband needs an objective logged at every "
            "validation (val/...)",
        ),
    ],
)
def test_bad_pruning_input_stops_the_sweep_before_any_job(workdir: Path, env: dict, overrides, expected):
    name = f"bad-{len(expected)}"
    result = run_lmexp("train", *sweep_args(workdir / "out", name, *SEARCH, *overrides), cwd=workdir, env=env)
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    assert not list((workdir / "out" / "multirun" / name).glob("*/sweep_point.json"))
