"""A Hydra callback for tests: each process of a job records what Lightning took from the cluster.

Add it to a run with ``rank_probe_overrides(directory)``. In every process that runs the job through
Hydra (each ``srun`` task, each task of a submitit job) it records the host, whether Hydra wrote
``.hydra/`` there, and, once Lightning's DDP strategy has set up the process group, the strategy's
cluster environment and the ranks it read from it, into ``<directory>/rank-<global rank>.json``. It only
observes: the training itself is unchanged.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def rank_probe_overrides(directory: Path) -> list[str]:
    """The Hydra overrides that add the probe to a run, writing into ``directory``.

    The job's processes import it as ``tests.sweeps.rank_probe``: the repository must be on their
    PYTHONPATH.
    """
    return [
        "+hydra.callbacks.rank_probe._target_=tests.sweeps.rank_probe.RankProbe",
        f"+hydra.callbacks.rank_probe.directory={directory}",
    ]


def read_probes(directory: Path) -> dict[int, dict[str, Any]]:
    """The records of every rank, by global rank."""
    found = (json.loads(path.read_text()) for path in Path(directory).glob("rank-*.json"))
    return {record["global_rank"]: record for record in found}


class RankProbe(Callback):
    """Records each process's host, Hydra output and Lightning ranks (see the module docstring)."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from lightning.pytorch.strategies import DDPStrategy

        facts = {"hostname": socket.gethostname(), "output_subdir": config.hydra.output_subdir}
        setup_distributed = DDPStrategy.setup_distributed
        directory = self.directory

        def recording_setup_distributed(strategy: DDPStrategy) -> None:
            setup_distributed(strategy)
            environment = strategy.cluster_environment
            record = {
                **facts,
                "environment": type(environment).__name__,
                "global_rank": strategy.global_rank,
                "local_rank": strategy.local_rank,
                "node_rank": strategy.node_rank,
                "world_size": strategy.world_size,
                "main_address": environment.main_address,
                "slurm_procid": os.environ.get("SLURM_PROCID"),
            }
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f"rank-{strategy.global_rank}.json"
            path.with_suffix(".tmp").write_text(json.dumps(record))
            path.with_suffix(".tmp").replace(path)

        DDPStrategy.setup_distributed = recording_setup_distributed
