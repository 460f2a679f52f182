"""Where a run starts from: ``ckpt_path=...``, or ``resume=auto`` picking up the run dir's own checkpoints.

A resumed run continues what the checkpoint's run was doing: the same model and tokenizer (checked), the
same W&B run (its id travels in the checkpoint) and the same CSV log (rows up to the checkpoint's step are
carried over; the replayed steps are logged again).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lmexp.checkpoints import (
    check_resumable,
    checkpoint_step,
    load_checkpoint,
    newest_good_checkpoint,
    remove_stale_temporaries,
)
from lmexp.errors import CheckpointError

log = logging.getLogger(__name__)

RESUME_MODES = ("auto", "never")


@dataclass
class ResumePoint:
    """A verified checkpoint to continue from."""

    path: Path
    step: int
    wandb_run_id: str | None = None
    checkpoint: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def run_dir(self) -> Path | None:
        """The run dir that wrote the checkpoint (``<run dir>/checkpoints/<name>.ckpt``), if it is one."""
        return self.path.parent.parent if self.path.parent.name == "checkpoints" else None


def resume_problems(cfg: DictConfig) -> list[str]:
    mode = cfg.get("resume")
    if mode not in (*RESUME_MODES, None, False):
        return [f"resume={mode!r}: expected auto (continue from the run dir's checkpoints) or never"]
    return []


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
    return ResumePoint(path, checkpoint_step(checkpoint), extras.get("wandb_run_id"), checkpoint)


def check_fits_run(point: ResumePoint, task: Any, tokenizer_path: Path) -> None:
    """The checkpoint's model and tokenizer must be this run's; then drop the loaded copy (memory)."""
    model_config = task.checkpoint_extras["model_config"]
    check_resumable(point.checkpoint, point.path, model_config, Path(tokenizer_path).read_bytes())
    point.checkpoint = {}


# ------------------------------------------------------------------------------------------- CSV log
def csv_rows_before(point: ResumePoint | None, cfg: DictConfig) -> list[dict[str, str]]:
    """The rows of the checkpoint run's CSV log logged before its step, to carry into this run's log.

    Read before this run's CSV logger starts, since Lightning's CSV writer replaces an existing file.
    """
    node = (cfg.get("logger") or {}).get("csv")
    if point is None or point.run_dir is None or not node:
        return []
    try:
        relative = _csv_file(node).relative_to(Path(str(cfg.paths.run_dir)))
    except ValueError:  # a CSV log outside the run dir: nothing to find in the old run dir
        return []
    source = point.run_dir / relative
    if not source.is_file():
        return []
    with open(source, newline="", encoding="utf-8") as handle:
        rows = [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]
    return [row for row in rows if "step" in row and float(row["step"]) < point.step]


def carry_csv_rows(loggers: list[Any], rows: list[dict[str, str]]) -> None:
    """Write ``rows`` at the start of this run's CSV log."""
    if not rows:
        return
    for logger in loggers:
        if type(logger).__name__ == "CSVLogger":
            writer = logger.experiment
            writer.metrics = rows + writer.metrics
            writer.save()


def _csv_file(node: Any) -> Path:
    version = node.get("version")
    if version in (None, ""):
        version_dir = ""
    else:
        version_dir = version if isinstance(version, str) else f"version_{version}"
    return Path(str(node.save_dir)) / str(node.get("name") or "") / version_dir / "metrics.csv"
