"""``hydra/launcher=slurm``: hydra-submitit-launcher's SLURM launcher, with only rank 0 writing ``.hydra/``.

A point's job has ``nodes x tasks_per_node`` tasks (one per device, as Lightning's SLURM environment
expects), and every task runs the point through Hydra: without this, every task writes the point's
``.hydra/`` at the same time. The other tasks skip it, as ranks started by ``srun`` do
(:func:`lmexp.cli.run_cli`); their log file and point record are left out by lmexp itself.
"""

from __future__ import annotations

from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SlurmLauncher


class SlurmLauncher(_SlurmLauncher):
    """submitit's SLURM launcher; in a job's tasks of global rank > 0, Hydra writes no ``.hydra/``."""

    def __call__(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        from lmexp.cli import external_rank

        if external_rank() > 0:
            sweep_overrides = [*sweep_overrides, "hydra.output_subdir=null"]
        return super().__call__(sweep_overrides, *args, **kwargs)
