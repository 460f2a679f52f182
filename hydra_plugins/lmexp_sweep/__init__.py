"""lmexp's Hydra plugins: a parallel local launcher and a resumable Optuna sweeper.

Hydra instantiates launchers and sweepers only from the ``hydra_plugins`` namespace, and imports every
module in it at start-up: keep this one light (optuna is imported when a sweep runs).

* :class:`ParallelLocalLauncher` (``hydra/launcher=local``): submitit's local launcher, one process per
  point, at most ``max_parallel`` at a time.
* :class:`OptunaSweeper` (``hydra/sweeper=tpe``, optuna_sweeper.py): the Optuna sweeper whose SQLite
  study continues where an interrupted sweep stopped, and whose pruner stops hopeless trials early.
* :class:`~hydra_plugins.lmexp_sweep.slurm_launcher.SlurmLauncher` (``hydra/launcher=slurm``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher

from hydra_plugins.lmexp_sweep.optuna_sweeper import OptunaSweeper

__all__ = ["OptunaSweeper", "ParallelLocalLauncher"]


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
