"""The run's loggers beyond CSV: W&B's online/offline choice, a sweep point's W&B identity, resuming a W&B
run, and closing every logger at the end of a job."""

from __future__ import annotations

import logging
import netrc
import os
import time
from pathlib import Path
from typing import Any

from lmexp.config import overrides as override_strings

log = logging.getLogger(__name__)

MODES = ("auto", "online", "offline", "disabled")


def resolve_wandb_mode(mode: str) -> str:
    """``auto`` -> ``online`` when W&B credentials exist (WANDB_API_KEY or a netrc entry), else ``offline``.

    An explicit ``WANDB_MODE`` in the environment wins over ``auto``.
    """
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
        if netrc.netrc().authenticators(host):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


# Overrides that say where a point runs, not what it is: left out of its W&B tags.
_UNTAGGED_PREFIXES = ("paths", "logger", "hydra", "sweep")
MAX_TAG_LENGTH = 64  # W&B refuses longer tags


def override_tags(overrides: list[str]) -> list[str]:
    """W&B tags from a point's overrides (``optim.lr=0.001``), without the ones that only place it."""
    placing = override_strings.under(overrides, _UNTAGGED_PREFIXES)
    return [
        f"{key}={value}"[:MAX_TAG_LENGTH]
        for override in overrides
        if override not in placing
        for key, value in [override_strings.split(override)]
        if value is not None
    ]


def run_identity(
    group: str | None, tags: list[str] | None, job_type: str | None, sweep_name: str | None
) -> tuple[str | None, list[str], str]:
    """Group, tags and job type of the W&B run: a sweep's point joins the sweep's group and is tagged
    with its overrides; a single run keeps what it was given."""
    from lmexp.config.compose import is_multirun, point_overrides

    tags = list(tags or [])
    if not is_multirun():
        return group, tags, job_type or "train"
    extra = [t for t in override_tags(point_overrides()) if t not in tags]
    return group or sweep_name, tags + extra, job_type or "sweep"


def wandb_logger(
    mode: str = "auto",
    project: str = "lmexp",
    entity: str | None = None,
    name: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    job_type: str | None = None,
    save_dir: str = ".",
    sweep_name: str | None = None,
    **init_kwargs: Any,
):
    """A Lightning ``WandbLogger`` whose run files land in ``<save_dir>/wandb``.

    In a sweep, ``group`` defaults to ``sweep_name``, ``job_type`` to ``sweep``, and the point's
    overrides are added to ``tags`` (see :func:`run_identity`).
    """
    from lightning.pytorch.loggers import WandbLogger

    from lmexp.errors import ConfigError

    if mode not in MODES:
        raise ConfigError(f"logger.wandb.mode={mode!r} is not one of {', '.join(MODES)}")
    os.environ.setdefault("WANDB_SILENT", "true")  # our summary names the run dir; keep the console clean
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    group, tags, job_type = run_identity(group, tags, job_type, sweep_name)
    logger = WandbLogger(
        project=project,
        entity=entity,
        name=name,
        group=group,
        tags=tags,
        job_type=job_type,
        save_dir=save_dir,
        mode=resolve_wandb_mode(mode),
        **init_kwargs,
    )
    from lmexp.training.compat import drop_wandb_init_argument

    drop_wandb_init_argument(logger, "anonymous")
    return logger


def is_wandb(logger: Any) -> bool:
    from lightning.pytorch.loggers import WandbLogger

    return isinstance(logger, WandbLogger)


def wandb_run_id(loggers: list[Any]) -> str | None:
    """The id of the run's W&B run (kept in checkpoints, so a resumed run continues it)."""
    return next((str(logger.version) for logger in loggers if is_wandb(logger)), None)


def start_resumed_wandb_run(logger: Any, attempts: int = 15) -> None:
    """Open the W&B run a resumed job continues; if a killed predecessor still holds it, start a new one.

    After ``kill -9`` of the training process alone, its W&B service process can live on and keep the run
    open; W&B then refuses the id ("run ID ... is in use"). Wait a little for it to exit, then log to a
    fresh W&B run rather than fail the resumed training.
    """
    from lmexp.training.compat import restart_wandb_run

    run_id = logger.version
    for attempt in range(attempts):
        try:
            logger.experiment  # noqa: B018 - opens the run
            return
        except Exception as error:
            if "is in use" not in str(error):
                raise
            if attempt == 0:
                log.info("W&B run %s is still held by the stopped job; waiting for it", run_id)
            restart_wandb_run(logger, new_run=False)
            time.sleep(1.0)
    log.warning("W&B run %s is still held by the stopped job; logging to a new W&B run", run_id)
    restart_wandb_run(logger, new_run=True)
    logger.experiment  # noqa: B018


def close_loggers(loggers: list[Any], status: str = "success") -> None:
    """Finalize every logger, each even if another one fails (the first failure is raised afterwards); finish
    the W&B run so a later job in this process starts its own."""
    failure: Exception | None = None
    for logger in loggers:
        try:
            logger.finalize(status)
        except Exception as error:  # noqa: BLE001 - e.g. the CSV log on a full disk; close the others first
            failure = failure or error
    if any(is_wandb(logger) for logger in loggers):
        import wandb

        if status == "preempted" and wandb.run is not None:
            wandb.run.mark_preempting()  # shown as preempted, not crashed; the resumed run continues it
        wandb.finish(exit_code=0 if status == "success" else 1)
    if failure is not None:
        raise failure
