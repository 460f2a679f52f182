"""``python -m lmexp.export ckpt_path=<.ckpt> out=<dir>``: a Hugging Face transformers model directory.

Options in conf/export.yaml; the conversion and its logit-parity check are in lmexp/inference/export.py.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lmexp.cli import guarded, run_cli
from lmexp.config.compose import config_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
@guarded
def main(cfg: DictConfig) -> None:
    from lmexp.inference.export import export

    export(cfg)


if __name__ == "__main__":
    run_cli(main)
