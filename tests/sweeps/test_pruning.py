"""Pruning of Optuna trials (lmexp/sweeps/pruning.py): its settings and checks, and the callback that reports
each validation to a real SQLite study and stops the run when Optuna's pruner says so.

The callback is driven by a stand-in trainer here (the fields Lightning's Trainer gives a callback): a real
fit per case would cost seconds; the end-to-end sweep through the CLI is in test_sweep_pruning.py.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lmexp.errors import ConfigError
from lmexp.sweeps.pruning import (
    TrialLink,
    TrialPruning,
    build_pruner,
    read_pruning,
    sweep_problems,
)


def test_each_pruner_name_is_optunas_own_pruner_with_its_settings():
    import optuna

    median = build_pruner(read_pruning({"pruner": "median", "median": {"n_warmup_steps": 10}}))
    assert isinstance(median, optuna.pruners.MedianPruner) and median._n_warmup_steps == 10
    hyperband = read_pruning({"pruner": "hyperband", "hyperband": {"min_resource": 5, "max_resource": 40}})
    assert isinstance(build_pruner(hyperband), optuna.pruners.HyperbandPruner)
    assert isinstance(build_pruner(read_pruning({})), optuna.pruners.NopPruner)
    assert not read_pruning({"pruner": "none"}).active


@pytest.mark.parametrize(
    ("sweeper", "expected"),
    [
        (
            {"pruner": "asha"},
            "hydra.sweeper.pruner='asha': expected one of Optuna's pruners median (MedianPruner), "
            "hyperband (HyperbandPruner), none (NopPruner)",
        ),
        ({"pruner": "median", "median": {"n_warmup_steps": -1}}, "hydra.sweeper.median.n_warmup_steps"),
        (
            {"pruner": "hyperband", "hyperband": {"min_resource": 10, "max_resource": 5}},
            "hydra.sweeper.hyperband.max_resource=5 is below hydra.sweeper.hyperband.min_resource=10",
        ),
        ({"pruner": "hyperband", "hyperband": {"max_resource": "all"}}, "expected a number of steps or auto"),
    ],
)
def test_bad_pruner_settings_are_one_line_each(sweeper: dict, expected: str):
    with pytest.raises(ConfigError) as error:
        read_pruning(sweeper)
    assert expected in str(error.value)


def test_what_a_pruning_sweep_needs_is_checked_before_it_starts():
    median = read_pruning({"pruner": "median"})
    assert sweep_problems(median, "sqlite:///x.db", "s", ["minimize"], "val/loss") == []
    problems = sweep_problems(median, None, None, ["minimize", "maximize"], "test/loss")
    assert len(problems) == 4
    assert problems[0].startswith("hydra.sweeper.pruner=median needs hydra.sweeper.storage")
    assert problems[1].startswith("hydra.sweeper.pruner=median needs hydra.sweeper.study_name")
    assert "prunes single-objective studies only" in problems[2]
    assert problems[3].startswith("objective=test/loss: hydra.sweeper.pruner=median needs an objective")
    # Without a pruner, none of this matters; a direction Optuna does not know always does.
    assert sweep_problems(read_pruning({}), None, None, ["minimize", "maximize"], "test/loss") == []
    assert sweep_problems(read_pruning({}), None, None, ["lowest"], "val/loss") == [
        "hydra.sweeper.direction=lowest: expected minimize or maximize"
    ]


# ------------------------------------------------------------------------------------------ the callback
def _study_with_a_finished_trial(tmp_path: Path) -> tuple[str, Any]:
    """A study holding one finished trial whose val/loss was 3.0 at steps 5 and 10, and one new trial."""
    import optuna

    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="s", storage=storage)
    done = study.ask()
    for step in (5, 10):
        done.report(3.0, step)
    study.tell(done, 3.0)
    study.ask()  # trial 1: the sweeper asked for it and launched its job
    return storage, study


class Trainer(SimpleNamespace):
    """What Lightning's Trainer shows a callback at a validation end (a stand-in: see the module doc)."""

    def __init__(self, value: float, step: int, rank: int = 0, world_size: int = 1, verdict: Any = None):
        broadcast = lambda obj, src: verdict if rank else obj  # noqa: E731 - rank 0's object on every rank
        super().__init__(
            callback_metrics={"val/loss": value},
            global_step=step,
            is_global_zero=rank == 0,
            world_size=world_size,
            sanity_checking=False,
            state=SimpleNamespace(fn="fit"),
            should_stop=False,
            loggers=[],
            strategy=SimpleNamespace(broadcast=broadcast),
        )


def test_a_trial_worse_than_the_median_is_pruned_at_its_validation_and_the_study_knows(tmp_path):
    import optuna
    from optuna.trial import TrialState

    storage, _ = _study_with_a_finished_trial(tmp_path)
    median = {"n_startup_trials": 1, "n_warmup_steps": 6}
    callback = TrialPruning(
        "val/loss", TrialLink(storage, "s", 1, read_pruning({"pruner": "median", "median": median}))
    )
    warming_up = Trainer(value=4.0, step=5)
    callback.on_fit_start(warming_up, None)
    callback.on_validation_end(warming_up, None)
    assert not warming_up.should_stop and callback.pruned is None

    bad = Trainer(value=5.0, step=10)  # its best so far (4.0) is worse than the median at step 10 (3.0)
    callback.on_validation_end(bad, None)
    assert bad.should_stop
    assert (callback.pruned.step, callback.pruned.value) == (10, 5.0)
    trial = optuna.load_study(study_name="s", storage=storage).trials[1]
    assert trial.state == TrialState.PRUNED
    assert trial.intermediate_values == {5: 4.0, 10: 5.0}


def test_under_ddp_only_rank_zero_asks_the_study_and_every_rank_follows_it(tmp_path):
    callback = TrialPruning("val/loss", link=None)  # rank 1 has no link: it never opens the study
    trainer = Trainer(value=1.0, step=10, rank=1, world_size=2, verdict=("prune", 9.0))
    callback.on_fit_start(trainer, None)
    callback.on_validation_end(trainer, None)
    assert trainer.should_stop and callback.pruned.value == 9.0  # rank 0's value, not its own

    going = TrialPruning("val/loss", link=None)
    trainer = Trainer(value=9.0, step=10, rank=1, world_size=2, verdict=("go", 1.0))
    going.on_validation_end(trainer, None)
    assert not trainer.should_stop and going.pruned is None


def test_an_objective_not_logged_at_validation_stops_the_run_with_one_line():
    callback = TrialPruning("val/acc", link=None)
    with pytest.raises(
        ConfigError, match=r"objective=val/acc is not logged at validation \(logged: val/loss\)"
    ):
        callback.on_validation_end(Trainer(value=1.0, step=5), None)
