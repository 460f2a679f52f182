"""``hydra/sweeper=tpe``: Hydra's Optuna sweeper with lmexp's trial loop: resumable, and pruning.

Hydra's sweeper (hydra-optuna-sweeper) composes the search space, the sampler and the trials' overrides;
this class keeps all of that and runs its own loop around them, because pruning needs three things the
plugin's loop cannot give:

* the study is created with the sweep's pruner (Hyperband's brackets also steer what the sampler sees);
* the study is loaded afresh from its storage after every batch of trials: their jobs wrote their reports
  and their PRUNED state into it, which Optuna's per-process cache of the trials a study object created
  (optuna.storages._CachedStorage) would hide from the sampler and from telling the outcome;
* a job that returns ``pruned: ...`` (lmexp/sweeps/point.py) leaves its trial PRUNED, not FAIL.

Resuming: with a storage, a re-run of the same sweep continues the study. Its finished, pruned and failed
trials count against ``n_trials``; a trial left RUNNING by an interrupted sweep is marked failed and a fresh
trial takes its place; trials enqueued in the study (``study.enqueue_trial``) run first. New jobs are
numbered after the trials the study holds, so a job's number is its trial's number.

Bad input (an unknown pruner, pruning without a storage, with several objectives or an objective that is
only known at the end of a run) stops the sweep before any job starts, in one line.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as _OptunaSweeper

log = logging.getLogger(__name__)


class OptunaSweeper(_OptunaSweeper):
    """Hydra's Optuna sweeper, resumable, with ``pruner`` (``median``, ``hyperband``, ``none``) and the
    pruners' settings ``median`` and ``hyperband`` (see lmexp/sweeps/pruning.py)."""

    def __init__(
        self, pruner: str = "none", median: Any = None, hyperband: Any = None, **params: Any
    ) -> None:
        super().__init__(**params)
        self.pruning = {"pruner": pruner, "median": median, "hyperband": hyperband}

    def sweep(self, arguments: list[str]) -> None:
        from lmexp.cli import guarded

        guarded(self._sweep)(arguments)  # bad input: one line, exit status 2, before any job

    def _sweep(self, arguments: list[str]) -> None:
        from lmexp.errors import ConfigError
        from lmexp.sweeps.pruning import read_pruning, sweep_problems

        impl = self.sweeper
        pruning = read_pruning(self.pruning)
        directions = [str(getattr(d, "name", d)) for d in impl._get_directions()]
        objective = str(impl.config.get("objective") or "val/loss")
        problems = sweep_problems(pruning, impl.storage, impl.study_name, directions, objective)
        if problems:
            raise ConfigError(problems)
        space, fixed, sampler, n_trials = search_space(impl, arguments)
        study = study_loader(impl, sampler, pruning, directions)
        to_go, impl.job_idx = continue_study(study(), n_trials)
        run_trials(impl, study, space, fixed, to_go, pruning.active)
        save_results(study(), Path(str(impl.config.hydra.sweep.dir)))


def search_space(impl: Any, arguments: list[str]) -> tuple[dict, dict, Any, int]:
    """The distributions to sample, the fixed overrides, the sampler and the number of trials, as Hydra's
    sweeper makes them from ``hydra.sweeper.params`` and the command line (a grid caps the trials)."""
    import optuna
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    impl._process_searchspace_config()
    space, fixed = create_params_from_overrides(impl._parse_sweeper_params_config() + list(arguments))
    space = {**(impl.search_space_distributions or {}), **space}
    for name in fixed:
        space.pop(name, None)
    sampler, n_trials = impl.sampler, impl.n_trials
    if isinstance(sampler, functools.partial) and sampler.func is optuna.samplers.GridSampler:
        grid = {name: impl._to_grid_sampler_choices(distribution) for name, distribution in space.items()}
        sampler = sampler(grid)
        n_trials = min(n_trials, math.prod(len(values) for values in grid.values()))
    return space, fixed, sampler, n_trials


def open_study(impl: Any, sampler: Any, pruning: Any, directions: list[str]) -> Any:
    """The sweep's study (created, or loaded from its storage), with the sweep's sampler and pruner."""
    import optuna

    from lmexp.sweeps.pruning import build_pruner, open_storage

    if impl.storage:
        Path(str(impl.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)  # the SQLite file's dir
    study = optuna.create_study(
        study_name=impl.study_name,
        storage=open_storage(impl.storage),
        sampler=sampler,
        pruner=build_pruner(pruning),
        directions=directions,
        load_if_exists=True,
    )
    log.info(f"Study {study.study_name} in {impl.storage}, sampler {type(sampler).__name__}, {directions}")
    return study


def study_loader(impl: Any, sampler: Any, pruning: Any, directions: list[str]) -> Callable[[], Any]:
    """A function that loads the sweep's study afresh from its storage; in memory (no storage), one that
    returns the same study each time (a new one would start empty)."""
    load = functools.partial(open_study, impl, sampler, pruning, directions)
    if impl.storage:
        return load
    study = load()
    return lambda: study


def continue_study(study: Any, n_trials: int) -> tuple[int, int]:
    """``(trials to go, the next job's number)``: the trials the study holds (finished, pruned, failed)
    count against ``n_trials``; one left RUNNING by an interrupted sweep is marked failed."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
    done = sum(trial.state != TrialState.WAITING for trial in study.get_trials(deepcopy=False))
    if done:
        log.info(f"Study {study.study_name}: {done} trials done before, {max(0, n_trials - done)} to go")
    return max(0, n_trials - done), done


def run_trials(
    impl: Any, study: Callable[[], Any], space: dict, fixed: dict, to_go: int, pruning: bool
) -> None:
    """Ask the study for trials, ``n_jobs`` at a time, launch their jobs and tell the study each outcome.

    ``study()`` loads the study afresh: one object asks for a batch's trials, another one, loaded after
    their jobs ran, tells their outcomes (see the module's docstring).
    """
    from lmexp.sweeps.point import TRIAL_ENV

    while to_go > 0:
        asking = study()
        trials = [asking.ask() for _ in range(min(to_go, impl.n_jobs))]
        overrides = impl._configure_trials(trials, space, fixed)
        if pruning:  # the job finds its trial by number (Hydra sets the variable in the job, also on SLURM)
            overrides = [
                (*job, f"++hydra.job.env_set.{TRIAL_ENV}={trial.number}")
                for job, trial in zip(overrides, trials, strict=True)
            ]
        returns = impl.launcher.launch(overrides, initial_job_idx=impl.job_idx)
        impl.job_idx += len(returns)
        telling = study()
        failures = [error for t, r in zip(trials, returns, strict=True) if (error := tell(telling, t, r))]
        if len(failures) / len(returns) > impl.max_failure_rate:
            log.error(
                f"{len(failures)} of {len(returns)} trials failed (max_failure_rate={impl.max_failure_rate})"
            )
            for job in returns:
                job.return_value  # noqa: B018 - raises the first failed job's own exception, as Hydra does
            raise failures[0]
        to_go -= len(trials)


def tell(study: Any, trial: Any, job: Any) -> Exception | None:
    """Tell the study how ``trial``'s job ended (COMPLETE, PRUNED or FAIL); the failure, if it failed."""
    from optuna.trial import TrialState

    from lmexp.sweeps.point import pruned_return

    try:
        value = job.return_value  # the job's exception, if it raised one
        if pruned_return(value):
            if not _stored(study, trial).state.is_finished():  # the job itself normally told the study
                study.tell(trial.number, state=TrialState.PRUNED)
            return None
        values = _values(value, len(study.directions))
    except Exception as error:  # noqa: BLE001 - a failed trial; the sweep goes on
        if not _stored(study, trial).state.is_finished():
            study.tell(trial.number, state=TrialState.FAIL)
        log.warning(f"trial {trial.number}: {error}")
        return error
    try:
        study.tell(trial.number, values)
    except RuntimeError as error:  # a grid sampler asks the study to stop once the grid is done
        if "Study.stop" not in str(error):
            raise
    return None


def _values(value: Any, n_objectives: int) -> list[float]:
    """The objective value(s) a job returned; ValueError for anything else (``failed: ...``)."""
    many = n_objectives > 1
    if isinstance(value, str) or (many and not isinstance(value, Sequence)):
        raise ValueError(value)
    values = [float(v) for v in (value if many else [value])]
    if len(values) != n_objectives:
        raise ValueError(f"{len(values)} objective values returned for {n_objectives} objectives")
    return values


def _stored(study: Any, trial: Any) -> Any:
    """``trial`` as its study's storage holds it now (its job may have changed it)."""
    return next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)


def save_results(study: Any, sweep_dir: Path) -> None:
    """``optimization_results.yaml`` in the sweep dir, as Hydra's Optuna sweeper writes it."""
    from omegaconf import OmegaConf

    if len(study.directions) > 1:
        front = [{"params": t.params, "values": t.values} for t in study.best_trials]
        results: dict[str, Any] = {"name": "optuna", "solutions": front}
    else:
        try:
            best = study.best_trial
        except ValueError:  # no trial completed
            return
        results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
        log.info(f"Best parameters: {best.params}, value: {best.value}")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
