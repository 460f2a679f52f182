"""lmexp's Hydra plugins: a parallel local launcher and a resumable Optuna sweeper.

Hydra instantiates launchers and sweepers only from the ``hydra_plugins`` namespace, and imports every
module in it at start-up: keep this one light (optuna is imported when a sweep runs).

* :class:`ParallelLocalLauncher` (``hydra/launcher=local``): submitit's local launcher, one process per
  point, at most ``max_parallel`` at a time.
* :class:`OptunaSweeper` (``hydra/sweeper=tpe``): the Optuna sweeper whose SQLite study continues where
  an interrupted sweep stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as _OptunaSweeper
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher

log = logging.getLogger(__name__)


class ParallelLocalLauncher(LocalLauncher):
    """submitit's local launcher (one process per point), at most ``max_parallel`` points at a time."""

    def __init__(self, max_parallel: int | None = None, **params: Any) -> None:
        super().__init__(**params)
        self.max_parallel = max_parallel

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
        size = self.max_parallel or len(job_overrides)
        returns: list[Any] = []
        for start in range(0, len(job_overrides), size):
            returns += super().launch(job_overrides[start : start + size], initial_job_idx + start)
        return returns


class OptunaSweeper(_OptunaSweeper):
    """The Hydra Optuna sweeper, resumable: with a storage and a study name, a re-run of the same sweep
    counts the trials the study already holds against ``n_trials`` and numbers new jobs after them.

    A trial left RUNNING by an interrupted sweep is marked failed, and a fresh trial takes its place.
    """

    def sweep(self, arguments: list[str]) -> None:
        impl = self.sweeper
        if impl.storage and impl.study_name:
            self._continue_study(impl)
        return impl.sweep(arguments)

    @staticmethod
    def _continue_study(impl: Any) -> None:
        import optuna
        from optuna.trial import TrialState

        Path(str(impl.sweep_dir)).mkdir(parents=True, exist_ok=True)  # the SQLite file lives there
        study = optuna.create_study(
            storage=impl.storage,
            study_name=impl.study_name,
            directions=impl._get_directions(),
            load_if_exists=True,
        )
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(trial.number, state=TrialState.FAIL)
        done = len(study.trials)
        if done:
            log.info(
                f"Study {impl.study_name}: {done} trials done before, {max(0, impl.n_trials - done)} to go"
            )
        impl.n_trials = max(0, impl.n_trials - done)
        impl.job_idx = done
