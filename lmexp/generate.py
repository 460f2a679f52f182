"""``python -m lmexp.generate ckpt_path=<.ckpt> prompt="..."``: sample continuations from a causal LM.

Options in conf/generate.yaml; the sampling code is in lmexp/inference/generate.py.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lmexp.cli import guarded, run_cli
from lmexp.config.compose import config_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="generate")
@guarded
def main(cfg: DictConfig) -> None:
    from lmexp.inference.generate import generate

    generate(cfg)


if __name__ == "__main__":
    run_cli(main)
