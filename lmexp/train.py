"""``python -m lmexp.train``: one training run (or, with ``-m``, a sweep of them).

The entry point only wires Hydra to :func:`lmexp.training.run.train`, which composes the run's objects,
fits, tests and writes metrics.json; Hydra's sweeps call it once per point through
:func:`lmexp.sweeps.point.sweep_point`. Heavy imports happen inside, so ``--help`` answers at once.
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from lmexp.cli import guarded, run_cli
from lmexp.config.compose import config_dir
from lmexp.errors import Preempted
from lmexp.sweeps.point import sweep_point


def train(cfg: DictConfig, extra_callbacks: list[Any] | None = None) -> dict[str, float]:
    """Run one training job described by ``cfg``; return the final metrics (see lmexp/training/run.py)."""
    from lmexp.training.run import train as run

    return run(cfg, extra_callbacks)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
@guarded
@sweep_point  # in a sweep (-m): skip finished points, record a failing one and go on
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except Preempted as stop:
        print(f"stopped: {stop}", file=sys.stderr, flush=True)
        # 0 once SLURM has the job requeued; otherwise the conventional status of a SIGTERM'd process, so
        # that schedulers and sweeps do not take the run for finished.
        raise SystemExit(0 if stop.requeued else 143) from None
    return metrics.get(cfg.objective)


if __name__ == "__main__":
    run_cli(main)
