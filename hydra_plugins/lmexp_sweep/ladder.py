"""The ladder sweeper (``hydra/sweeper=ladder``, picked by ``+sweep=ladder``): a scaling-law ladder.

It expands ``sweep.budgets`` into the ladder's isoFLOP grid (:func:`lmexp.sweeps.ladder.ladder_points`),
checks it before any job starts (a bad budget, metric or model ends the sweep with one ``error:`` line and
exit status 2), prints the ladder, and launches the points through the configured launcher in batches,
as Hydra's ``BasicSweeper`` does. Each point is a normal lmexp job: ``lmexp.sweeps.point.sweep_point`` skips,
resumes or isolates it and writes its ``sweep_point.json``.

Hydra imports every module under ``hydra_plugins`` at start-up, so lmexp is imported only when a ladder runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class LadderSweeper(Sweeper):
    """Launches the points of a scaling-law ladder (see lmexp/sweeps/ladder.py)."""

    def __init__(self, max_batch_size: int | None = None) -> None:
        super().__init__()
        self.max_batch_size = max_batch_size
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def job_overrides(self, arguments: list[str]) -> list[list[str]]:
        """Every point's overrides: the command line, then the point's own; one error line if bad."""
        from lmexp.cli import guarded
        from lmexp.errors import UserError
        from lmexp.sweeps.ladder import plan_ladder, print_ladder

        assert self.config is not None
        try:
            points = plan_ladder(self.config, arguments)
        except UserError as error:
            # guarded prints the one line (releasing stderr that lmexp.cli holds back) and exits with 2.
            guarded(_raise)(error)
        print_ladder(points, self.config)
        return [[*arguments, *point.overrides] for point in points]

    def _batches(self, jobs: list[list[str]]) -> list[list[list[str]]]:
        size = self.max_batch_size if self.max_batch_size and self.max_batch_size > 0 else len(jobs)
        return [jobs[start : start + size] for start in range(0, len(jobs), size)]

    def sweep(self, arguments: list[str]) -> list[list[JobReturn]]:
        assert self.config is not None and self.launcher is not None
        jobs = self.job_overrides(list(arguments))
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns: list[list[JobReturn]] = []
        first = 0
        for batch in self._batches(jobs):
            self.validate_batch_is_legal(batch)  # Hydra composes every job first: no surprise mid-ladder
            results = self.launcher.launch(batch, initial_job_idx=first)
            for result in results:
                _ = result.return_value  # re-raises a job's exception, as the basic sweeper does
            first += len(batch)
            returns.append(list(results))
        return returns


def _raise(error: BaseException) -> None:
    raise error
