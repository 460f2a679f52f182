"""Helpers of the sweep tests: run ``python -m lmexp.<command>`` as a user would, read a sweep's records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import TINY


def lmexp_env(cache_dir: Path, home: Path, extra: dict | None = None) -> dict[str, str]:
    """The environment of a command under test: shared data cache, W&B offline in a private dir."""
    env = {**os.environ, "LMEXP_CACHE_DIR": str(cache_dir), "WANDB_MODE": "offline"}
    env |= {"WANDB_CONFIG_DIR": str(home), "WANDB_CACHE_DIR": str(home), "WANDB_DATA_DIR": str(home)}
    env.pop("HYDRA_FULL_ERROR", None)
    return env | (extra or {})


def run_lmexp(
    module: str, *args: str, cwd: Path, env: dict[str, str], timeout: int = 300
) -> subprocess.CompletedProcess:
    """``python -m lmexp.<module> <args>`` in ``cwd``; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", f"lmexp.{module}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sweep_args(output_dir: Path, name: str, *overrides: str) -> list[str]:
    """A tiny multirun into ``<output_dir>/multirun/<name>``."""
    return ["-m", *TINY, f"paths.output_dir={output_dir}", f"sweep.name={name}", *overrides]


def records(sweep_dir: Path) -> dict[int, dict]:
    """The sweep_point.json of every point, by job number."""
    found = (json.loads(p.read_text()) for p in sweep_dir.glob("*/sweep_point.json"))
    return {r["num"]: r for r in found}
