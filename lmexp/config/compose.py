"""Composing ``conf/`` in-process, as ``python -m lmexp.<command>`` does (for plan, benchmarks and tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def config_dir() -> str:
    """Absolute path of the ``conf/`` directory next to the package."""
    return str(Path(__file__).resolve().parent.parent.parent / "conf")


def compose_job(
    overrides: list[str],
    output_dir: str | Path,
    config_name: str = "train",
    job_num: int = 0,
    mode: Any = None,
    keep_hydra: bool = False,
) -> Any:
    """``conf/<config_name>.yaml`` composed as ``python -m lmexp.<command> <overrides>`` would.

    Hydra's job state is set as its launcher sets it (output dir, job number, optionally the run mode), so
    ``${hydra:runtime.output_dir}`` and sweep-aware code resolve as in a real job. Without ``keep_hydra``
    the ``hydra`` node is dropped, leaving the job's config. Works inside or outside an initialised Hydra.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    if GlobalHydra.instance().is_initialized():
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    else:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = job_num
        if mode is not None:
            cfg.hydra.mode = mode
    HydraConfig.instance().set_config(cfg)
    if not keep_hydra:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def choice(group: str, fallback: str) -> str:
    """The option picked for ``group`` (``bert`` for model) as the user typed it; ``fallback`` outside
    Hydra."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return str(HydraConfig.get().runtime.choices[group])
    except (ValueError, KeyError, AttributeError):
        return fallback


def is_multirun() -> bool:
    """True inside a job of ``-m`` (a sweep), False for a single run or outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def point_overrides() -> list[str]:
    """The overrides that make this job the point it is (what the user and the sweeper set)."""
    from hydra.core.hydra_config import HydraConfig

    return [str(o) for o in HydraConfig.get().overrides.task]
