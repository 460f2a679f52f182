"""Where a run starts from: ``ckpt_path=...``, or ``resume=auto`` picking up the run dir's own checkpoints.

A resumed run continues what the checkpoint's run was doing: the same model and tokenizer (checked), the
same W&B run (its id travels in the checkpoint) and the same CSV log (rows up to the checkpoint's step are
carried over; the replayed steps are logged again). A checkpoint also keeps the log rows of its steps that
were not on disk yet when it was written, so a job killed right after a save loses no row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from lmexp.errors import CheckpointError
from lmexp.training import compat
from lmexp.training.checkpoints import (
    check_resumable,
    checkpoint_step,
    load_checkpoint,
    newest_good_checkpoint,
    remove_stale_temporaries,
)
from lmexp.training.csv_log import read_csv_log

log = logging.getLogger(__name__)

LOG_ROWS_KEY = "lmexp_log_rows"  # in a checkpoint: {"unflushed": [CSV rows], "unlogged": [rows]}


@dataclass
class ResumePoint:
    """A verified checkpoint to continue from."""

    path: Path
    step: int
    wandb_run_id: str | None = None
    checkpoint: dict[str, Any] = field(default_factory=dict, repr=False)
    log_rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)

    @property
    def run_dir(self) -> Path | None:
        """The run dir that wrote the checkpoint (``<run dir>/checkpoints/<name>.ckpt``), if it is one."""
        return self.path.parent.parent if self.path.parent.name == "checkpoints" else None


def checkpoint_dir(cfg: DictConfig) -> Path:
    node = (cfg.get("callbacks") or {}).get("checkpoint") or {}
    return Path(str(node.get("dirpath") or Path(str(cfg.paths.run_dir)) / "checkpoints"))


def resolve_resume(cfg: DictConfig) -> ResumePoint | None:
    """The checkpoint this run continues from, loaded and verified; None for a fresh start.

    ``ckpt_path`` wins; otherwise ``resume=auto`` takes the newest readable checkpoint in the run's
    checkpoint dir (``last.ckpt`` first), skipping damaged ones with a warning.
    """
    if cfg.get("ckpt_path"):
        path = Path(str(cfg.ckpt_path)).expanduser()
        return _resume_point(path, load_checkpoint(path))
    if cfg.get("resume") != "auto":
        return None
    directory = checkpoint_dir(cfg)
    path, skipped = newest_good_checkpoint(directory)
    for problem in skipped:
        log.warning("resume=auto: skipping a damaged checkpoint: %s", problem)
    if path is None:
        if skipped:
            raise CheckpointError(
                f"resume=auto: no readable checkpoint in {directory} ({len(skipped)} damaged); "
                "delete them or set resume=never to start afresh"
            )
        return None
    remove_stale_temporaries(directory)
    point = _resume_point(path, load_checkpoint(path, key="resume"))
    log.info("resume=auto: continuing from %s (step %d)", path, point.step)
    return point


def _resume_point(path: Path, checkpoint: dict[str, Any]) -> ResumePoint:
    extras = checkpoint.get("lmexp", {})
    step = checkpoint_step(checkpoint)
    return ResumePoint(path, step, extras.get("wandb_run_id"), checkpoint, checkpoint.get(LOG_ROWS_KEY) or {})


def check_fits_run(point: ResumePoint, task: Any, tokenizer: Any) -> None:
    """The checkpoint's model, LoRA base and tokenizer must be this run's; then drop the loaded copy."""
    from lmexp.data.tokenizer_store import tokenizer_files

    check_resumable(point.checkpoint, point.path, task.checkpoint_extras, tokenizer_files(tokenizer))
    point.checkpoint = {}


# ------------------------------------------------------------------------------------------- CSV log
class LogRowsInCheckpoint(Callback):
    """Put into every checkpoint the log rows of its steps that are not on disk yet.

    ModelCheckpoint saves in ``on_train_batch_end``; Lightning hands that step's metrics to the loggers
    only after every hook of the step has run, and the CSV logger keeps rows given to it directly (the
    learning rate) in memory until the next flush. A job killed between the save and the log would resume
    without those rows. So each checkpoint carries the rows still in the CSV logger's memory
    (``unflushed``) and, for a save between this step's hooks and its log, the step's row (``unlogged``,
    which no logger has). A resumed run adds whichever of them its old CSV log lacks.
    """

    def __init__(self) -> None:
        self._row_pending = False  # the step's hooks have run and its row is not logged yet

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        # Lightning logs the row after its hooks, on the steps it logs at: the same test as its own.
        self._row_pending = not compat.is_accumulating(trainer) and compat.logs_this_step(trainer)

    def on_train_batch_start(self, *args: Any) -> None:
        self._row_pending = False

    def on_validation_start(self, *args: Any) -> None:
        self._row_pending = False

    def on_train_epoch_end(self, *args: Any) -> None:
        self._row_pending = False

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if not trainer.is_global_zero:
            return  # the other ranks' loggers are placeholders, and their checkpoint is never written
        unflushed = [
            dict(row) for logger in _csv_loggers(trainer.loggers) for row in logger.experiment.metrics
        ]
        unlogged = []
        if self._row_pending:
            metrics = compat.pending_log_row(trainer)
            if metrics:
                row = {name: float(value) for name, value in metrics.items()}
                row["epoch"] = trainer.current_epoch
                unlogged.append({**row, "step": compat.batches_that_stepped(trainer)})
        checkpoint[LOG_ROWS_KEY] = {"unflushed": unflushed, "unlogged": unlogged}


@dataclass
class CarriedRows:
    """What a resumed run's loggers take over from the run that wrote its checkpoint."""

    csv: list[dict[str, Any]] = field(default_factory=list)
    """The old CSV log's rows before the checkpoint's step, then the checkpoint's rows it lacked."""
    replay: list[dict[str, Any]] = field(default_factory=list)
    """Rows no logger got (a kill between a save and its step's log), for the loggers other than CSV."""


def log_rows_before(point: ResumePoint | None, cfg: DictConfig) -> CarriedRows:
    """The log rows a run resumed from ``point`` carries over.

    Read before this run's CSV logger starts, since Lightning's CSV writer replaces an existing file. Without
    a CSV log there is no record of what the other loggers got, so nothing is replayed to them.
    """
    node = (cfg.get("logger") or {}).get("csv")
    if point is None or point.run_dir is None or not node:
        return CarriedRows()
    try:
        relative = _csv_file(node).relative_to(Path(str(cfg.paths.run_dir)))
    except ValueError:  # a CSV log outside the run dir: nothing to find in the old run dir
        return CarriedRows()
    source = point.run_dir / relative
    rows = [row for row in read_csv_log(source) if float(row["step"]) < point.step]

    def missing(kind: str) -> list[dict[str, Any]]:
        saved = point.log_rows.get(kind, [])
        return [row for row in saved if float(row["step"]) < point.step and not _has_row(rows, row)]

    unlogged = missing("unlogged")
    return CarriedRows(csv=rows + missing("unflushed") + unlogged, replay=unlogged)


def _has_row(rows: list[dict[str, Any]], wanted: dict[str, Any]) -> bool:
    """Whether a row of ``rows`` has ``wanted``'s step and metric names."""
    names = set(wanted) - {"epoch"}
    return any(float(row["step"]) == float(wanted["step"]) and names <= set(row) for row in rows)


def carry_log_rows(loggers: list[Any], carried: CarriedRows) -> None:
    """Write the carried rows at the start of this run's CSV log; log the unlogged ones to the others."""
    for logger in loggers:
        if logger in _csv_loggers(loggers):
            if carried.csv:
                writer = logger.experiment
                writer.metrics = carried.csv + writer.metrics
                writer.save()
            continue
        for row in carried.replay:
            logger.log_metrics(
                {name: value for name, value in row.items() if name != "step"}, step=row["step"]
            )


def _csv_loggers(loggers: list[Any]) -> list[Any]:
    from lightning.pytorch.loggers import CSVLogger

    return [logger for logger in loggers if isinstance(logger, CSVLogger)]


def _csv_file(node: Any) -> Path:
    version = node.get("version")
    if version in (None, ""):
        version_dir = ""
    else:
        version_dir = version if isinstance(version, str) else f"version_{version}"
    return Path(str(node.save_dir)) / str(node.get("name") or "") / version_dir / "metrics.csv"
