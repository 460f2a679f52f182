"""``python -m lmexp.eval ckpt_path=<.ckpt>``: evaluate a checkpoint on a test split, with predictions.

Writes metrics.json and predictions.jsonl into its run dir; options in conf/eval.yaml, the logic in
lmexp/inference/evaluate.py.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lmexp.cli import guarded, run_cli
from lmexp.config.compose import config_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
@guarded
def main(cfg: DictConfig) -> None:
    from lmexp.inference.evaluate import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    run_cli(main)
