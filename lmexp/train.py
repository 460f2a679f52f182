"""``python -m lmexp.train``: compose -> build data, model, task, trainer -> fit -> test -> metrics.json.

Heavy imports (torch, Lightning, torchmetrics) happen inside :func:`train`, so ``--help`` and
``--cfg job`` answer at once.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from lmexp.cli import config_dir, guarded, run_cli


def train(cfg: DictConfig, extra_callbacks: list[Any] | None = None) -> dict[str, float]:
    """Run one training job described by ``cfg``; return the final metrics (also in metrics.json)."""
    from lmexp.builders import (
        build_callbacks,
        build_datamodule,
        build_loggers,
        build_task,
        build_trainer,
        check_config,
        close_loggers,
        finish,
        quiet_lightning,
        resolve_ckpt_path,
    )

    check_config(cfg)  # every config error, in one line, before any data work
    ckpt_path = resolve_ckpt_path(cfg)

    import lightning.pytorch as pl

    quiet_lightning()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    datamodule.prepare()
    task = build_task(cfg, datamodule)
    loggers = build_loggers(cfg)
    callbacks = build_callbacks(cfg, loggers) + list(extra_callbacks or [])
    trainer = build_trainer(cfg, loggers, callbacks)

    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
        # Final metrics come from the final weights (the best checkpoint by val loss is kept as well).
        results = trainer.validate(task, datamodule=datamodule, verbose=False)[0]
        if cfg.run_test and datamodule.has_test:
            results |= trainer.test(task, datamodule=datamodule, verbose=False)[0]
    except BaseException:
        close_loggers(loggers, status="failed")
        raise
    return finish(cfg, trainer, results, datamodule, callbacks)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
@guarded
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get(cfg.objective)


if __name__ == "__main__":
    run_cli(main)
