"""Pruning Optuna trials: the pruner's settings, the sweep's checks, the callback that reports validations.

``hydra.sweeper.pruner=median|hyperband|none`` (conf/hydra/sweeper/tpe.yaml) picks Optuna's MedianPruner,
HyperbandPruner or NopPruner, with their main settings under ``hydra.sweeper.median.*`` and
``hydra.sweeper.hyperband.*``. Steps are training steps: a trial reports its objective at the global step
of each validation.

How a trial is reached: the sweeper (hydra_plugins/lmexp_sweep) starts each trial's job with the trial's
number in the environment (:data:`TRIAL_ENV`, through Hydra's ``hydra.job.env_set``, so it also reaches
jobs on SLURM). Global rank 0 of the job reads the study's storage and name and the pruner settings from the
job's own Hydra config (``hydra.sweeper``), opens the study in its storage (SQLite in the sweep dir, on the
shared file system under SLURM), and :class:`TrialPruning` reports the objective at every validation end
and asks the pruner. The other ranks of the job (DDP) never open the study: rank 0 broadcasts its decision.
A pruned run stops at that validation (``trainer.should_stop``), tells the study the trial is PRUNED, tags
its W&B run ``pruned``, and :func:`lmexp.training.run.train` raises
:class:`~lmexp.errors.TrialPruned`, which the sweep point records as pruned (lmexp/sweeps/point.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from lightning.pytorch import Callback

from lmexp.config.schema import Schema, at_least, collect, parse, plain, positive
from lmexp.errors import ConfigError, TrialPruned
from lmexp.sweeps.point import TRIAL_ENV

log = logging.getLogger(__name__)

PRUNERS = {"median": "MedianPruner", "hyperband": "HyperbandPruner", "none": "NopPruner"}
SQLITE_WAIT_S = 60  # parallel trials write to one SQLite file: wait for its lock instead of failing


# ------------------------------------------------------------------------------------------- settings
@dataclass
class MedianSettings(Schema):
    """Optuna's MedianPruner: prune a trial whose objective at a step is worse than the median there."""

    group: ClassVar[str] = "hydra.sweeper.median"

    n_startup_trials: int = at_least(5, 0)
    """Trials that finish before any trial is pruned (the median needs finished trials)."""
    n_warmup_steps: int = at_least(0, 0)
    """Training steps of a trial before it can be pruned."""
    interval_steps: int = positive(1)
    """Check every this many steps after the warm-up (1: at every validation)."""
    n_min_trials: int = positive(1)
    """Finished trials that must have reported at a step before the median there is used."""


@dataclass
class HyperbandSettings(Schema):
    """Optuna's HyperbandPruner: successive halving in brackets of different aggressiveness."""

    group: ClassVar[str] = "hydra.sweeper.hyperband"

    min_resource: int = positive(1)
    """Training steps every trial gets before it can be pruned; set it to the first validation's step."""
    max_resource: int | str = "auto"
    """Training steps of a whole trial; ``auto``: the most steps a finished trial reported."""
    reduction_factor: int = at_least(3, 2)
    """1 in reduction_factor trials goes on at each rung; it also sets the number of brackets."""

    def problems(self) -> list[str]:
        if isinstance(self.max_resource, str) and self.max_resource != "auto":
            return [f"{self.group}.max_resource={self.max_resource!r}: expected a number of steps or auto"]
        if isinstance(self.max_resource, int) and self.max_resource < self.min_resource:
            return [
                f"{self.group}.max_resource={self.max_resource} is below "
                f"{self.group}.min_resource={self.min_resource}"
            ]
        return []


@dataclass
class Pruning:
    """The sweep's pruner: its name and the settings of each pruner (only the named one's are used)."""

    name: str
    median: MedianSettings
    hyperband: HyperbandSettings

    @property
    def active(self) -> bool:
        """Whether trials report to the study and can be stopped early."""
        return self.name != "none"


def read_pruning(sweeper: Any) -> Pruning:
    """The pruning settings of a ``hydra.sweeper`` node (or mapping); one ConfigError naming every problem."""
    node = plain(sweeper) or {}
    name = node.get("pruner", "none")
    problems: list[str] = []
    if name not in PRUNERS:
        optuna_names = ", ".join(f"{key} ({value})" for key, value in PRUNERS.items())
        problems.append(f"hydra.sweeper.pruner={name!r}: expected one of Optuna's pruners {optuna_names}")
    median = collect(problems, lambda: parse(MedianSettings, node.get("median") or {}))
    hyperband = collect(problems, lambda: parse(HyperbandSettings, node.get("hyperband") or {}))
    if problems:
        raise ConfigError(problems)
    return Pruning(str(name), median, hyperband)


def sweep_problems(
    pruning: Pruning, storage: Any, study_name: Any, directions: list[str], objective: str
) -> list[str]:
    """What stops a sweep with ``pruning`` from running, one line each (checked before any job starts)."""
    problems = [
        f"hydra.sweeper.direction={direction}: expected minimize or maximize"
        for direction in directions
        if direction not in ("minimize", "maximize")
    ]
    if not pruning.active:
        return problems
    where = f"hydra.sweeper.pruner={pruning.name}"
    if not storage:
        problems.append(
            f"{where} needs hydra.sweeper.storage (e.g. sqlite:///<sweep dir>/optuna.db): each trial's job "
            "reports to the study through it"
        )
    if not study_name:
        problems.append(f"{where} needs hydra.sweeper.study_name: each trial's job finds its study by name")
    if len(directions) != 1:
        problems.append(
            f"{where}: Optuna prunes single-objective studies only, and hydra.sweeper.direction="
            f"[{','.join(directions)}] has {len(directions)} objectives"
        )
    if not objective.startswith("val/"):
        problems.append(
            f"objective={objective}: {where} needs an objective logged at every validation (val/...), "
            f"and {objective} is only known when the run ends"
        )
    return problems


def build_pruner(pruning: Pruning) -> Any:
    """Optuna's pruner object for ``pruning``."""
    import optuna

    if pruning.name == "median":
        return optuna.pruners.MedianPruner(**dataclasses.asdict(pruning.median))
    if pruning.name == "hyperband":
        return optuna.pruners.HyperbandPruner(**dataclasses.asdict(pruning.hyperband))
    return optuna.pruners.NopPruner()


def open_storage(url: Any) -> Any:
    """The study's storage for ``url``: an SQLite file waits for its lock (parallel trials write to it).

    ``None`` (in memory), storage objects and Redis URLs are returned as they are.
    """
    import optuna

    if not isinstance(url, str) or url.startswith("redis"):
        return url
    engine = {"connect_args": {"timeout": SQLITE_WAIT_S}} if url.startswith("sqlite") else None
    return optuna.storages.RDBStorage(url, engine_kwargs=engine)


# -------------------------------------------------------------------------------------- the job's trial
@dataclass(frozen=True)
class TrialLink:
    """Where a job's trial lives: the study's storage and name, the trial's number, the sweep's pruner."""

    storage: str
    study_name: str
    number: int
    pruning: Pruning

    def open(self) -> Any:
        """The trial (``optuna.trial.Trial``) in its study, whose pruner is the sweep's."""
        import optuna

        storage = open_storage(self.storage)
        study = optuna.load_study(
            study_name=self.study_name,
            storage=storage,
            pruner=build_pruner(self.pruning),
            sampler=optuna.samplers.RandomSampler(),  # the job samples nothing; the sweeper did
        )
        study_id = storage.get_study_id_from_name(self.study_name)
        # Optuna 2.10 has no call that hands out a RUNNING trial by number; Trial(study, trial_id) is the
        # object its own study.ask() returns, bound to the trial the sweeper asked for.
        return optuna.trial.Trial(
            study, storage.get_trial_id_from_study_id_trial_number(study_id, self.number)
        )


def job_trial_link() -> TrialLink | None:
    """This job's trial, when it is a trial of a pruning sweep and this process runs Hydra's job."""
    from hydra.core.hydra_config import HydraConfig

    number = os.environ.get(TRIAL_ENV, "")
    if not number.isdigit() or not HydraConfig.initialized():
        return None
    sweeper = HydraConfig.get().sweeper
    return TrialLink(str(sweeper.storage), str(sweeper.study_name), int(number), read_pruning(sweeper))


def pruning_callback(objective: str) -> TrialPruning | None:
    """The callback of a trial of a pruning sweep (every rank of its job gets one), else None."""
    from lmexp.cli import external_rank

    if not os.environ.get(TRIAL_ENV, "").isdigit():
        return None
    return TrialPruning(objective, job_trial_link() if external_rank() == 0 else None)


class TrialPruning(Callback):
    """At every validation of training, report ``objective`` to the run's Optuna trial and stop when pruned.

    Global rank 0 alone talks to the study (``link``; None on the other ranks) and broadcasts its verdict,
    so all ranks stop at the same validation. A pruned run sets ``trainer.should_stop`` (Lightning ends the
    fit cleanly, checkpoints included), tells the study the trial is PRUNED at once, and keeps the verdict
    in :attr:`pruned` for :func:`lmexp.training.run.train` to raise.
    """

    def __init__(self, objective: str, link: TrialLink | None) -> None:
        self.objective = objective
        self.link = link
        self.pruned: TrialPruned | None = None
        self._trial: Any = None
        self._reporting = True

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero and self.link is not None:
            self._trial = self.link.open()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.pruned is not None:
            return
        verdict = self._verdict(trainer) if trainer.is_global_zero else None
        if trainer.world_size > 1:
            verdict = trainer.strategy.broadcast(verdict, src=0)
        kind, detail = verdict
        if kind == "missing":
            raise ConfigError(detail)
        if kind == "prune":
            self.pruned = TrialPruned(self.objective, float(detail), trainer.global_step)
            trainer.should_stop = True
            if trainer.is_global_zero:
                self._mark_pruned(trainer)

    def _verdict(self, trainer: Any) -> tuple[str, Any]:
        """("go", value), ("prune", value) or ("missing", message), on rank 0."""
        value = trainer.callback_metrics.get(self.objective)
        if value is None:
            logged = ", ".join(sorted(k for k in trainer.callback_metrics if k.startswith("val/")))
            return "missing", (
                f"objective={self.objective} is not logged at validation (logged: {logged or 'nothing'}); "
                "pruning reports the objective at every validation"
            )
        value = float(value)
        if self._trial is None or not self._reporting:
            return "go", value
        try:
            with warnings.catch_warnings():  # a resumed run reports its earlier steps again: ignored
                warnings.filterwarnings("ignore", message="The reported value is ignored")
                self._trial.report(value, trainer.global_step)
            prune = self._trial.should_prune()
        except RuntimeError as error:  # the study has finished this trial already (e.g. marked failed)
            log.warning("trial %d: no pruning from here on: %s", self.link.number, error)
            self._reporting = False
            return "go", value
        return ("prune" if prune else "go"), value

    def _mark_pruned(self, trainer: Any) -> None:
        """Tell the study, and mark the W&B run (summary and tag), at the validation that pruned it."""
        from optuna.trial import TrialState

        from lmexp.training.loggers import is_wandb

        self._trial.study.tell(self._trial, state=TrialState.PRUNED)
        log.info("trial %d pruned: %s", self.link.number, self.pruned)
        for logger in trainer.loggers:
            if is_wandb(logger):
                run = logger.experiment
                run.summary.update({"sweep/pruned": True, "sweep/pruned_at_step": self.pruned.step})
                run.tags = (*run.tags, "pruned")
