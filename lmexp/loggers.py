"""Logger factories that need more than a ``_target_`` (W&B's online/offline choice)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

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
_UNTAGGED_PREFIXES = ("paths.", "logger.", "hydra.", "sweep.")
MAX_TAG_LENGTH = 64  # W&B refuses longer tags


def override_tags(overrides: list[str]) -> list[str]:
    """W&B tags from a point's overrides (``optim.lr=0.001``), without the ones that only place it."""
    tags = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if "=" in override and not f"{key}.".startswith(_UNTAGGED_PREFIXES):
            tags.append(override.lstrip("+~")[:MAX_TAG_LENGTH])
    return tags


def run_identity(
    group: str | None, tags: list[str] | None, job_type: str | None, sweep_name: str | None
) -> tuple[str | None, list[str], str]:
    """Group, tags and job type of the W&B run: a sweep's point joins the sweep's group and is tagged
    with its overrides; a single run keeps what it was given."""
    from lmexp.sweep import is_multirun, point_overrides

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
    # Lightning always passes anonymous=None, which wandb 0.31 answers with a deprecation warning on the
    # console of every run; the setting has no effect, so leave it out.
    if logger._wandb_init.get("anonymous") is None:
        logger._wandb_init.pop("anonymous", None)
    return logger
