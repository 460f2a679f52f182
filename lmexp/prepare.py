"""``python -m lmexp.prepare <data and tokenizer overrides>``: tokenize a corpus before training starts.

Options in conf/prepare.yaml; the logic is in lmexp/data/datamodule.py (:func:`prepare_command`). Several
processes (a SLURM array, srun tasks, or explicit ``rank``/``world_size``) share the work.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lmexp.cli import guarded, run_cli
from lmexp.config.compose import config_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="prepare")
@guarded
def main(cfg: DictConfig) -> None:
    from lmexp.data.datamodule import prepare_command

    prepare_command(cfg)


if __name__ == "__main__":
    run_cli(main)
