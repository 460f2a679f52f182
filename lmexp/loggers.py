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


def wandb_logger(
    mode: str = "auto",
    project: str = "lmexp",
    entity: str | None = None,
    name: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    job_type: str = "train",
    save_dir: str = ".",
    **init_kwargs: Any,
):
    """A Lightning ``WandbLogger`` whose run files land in ``<save_dir>/wandb``."""
    from lightning.pytorch.loggers import WandbLogger

    from lmexp.errors import ConfigError

    if mode not in MODES:
        raise ConfigError(f"logger.wandb.mode={mode!r} is not one of {', '.join(MODES)}")
    os.environ.setdefault("WANDB_SILENT", "true")  # our summary names the run dir; keep the console clean
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        project=project,
        entity=entity,
        name=name,
        group=group,
        tags=list(tags or []),
        job_type=job_type,
        save_dir=save_dir,
        mode=resolve_wandb_mode(mode),
        **init_kwargs,
    )
