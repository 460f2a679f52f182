"""``python -m lmexp.train``: compose -> build data, model, task, trainer -> fit -> test -> metrics.json.

Heavy imports (torch, Lightning, torchmetrics) happen inside :func:`train`, so ``--help`` and
``--cfg job`` answer at once.
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from lmexp.cli import config_dir, guarded, run_cli
from lmexp.errors import Preempted
from lmexp.sweep import sweep_point


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
        wandb_run_id,
    )
    from lmexp.resume import carry_log_rows, check_fits_run, log_rows_before, resolve_resume
    from lmexp.strategies import end_job

    check_config(cfg)  # every config error, in one line, before any data work
    resume = resolve_resume(cfg)  # ckpt_path, or resume=auto: verified before any data work too

    import lightning.pytorch as pl

    quiet_lightning()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    datamodule.prepare()
    task = build_task(cfg, datamodule)
    if resume:
        check_fits_run(resume, task, datamodule.tokenizer.path)
    carried_rows = log_rows_before(resume, cfg)  # read before the CSV logger replaces the file
    loggers = build_loggers(cfg, wandb_run_id=resume.wandb_run_id if resume else None)
    if pl.utilities.rank_zero_only.rank == 0:  # other ranks' loggers are placeholders that write nothing
        carry_log_rows(loggers, carried_rows)
    task.checkpoint_extras["wandb_run_id"] = wandb_run_id(loggers)
    callbacks = build_callbacks(cfg, loggers) + list(extra_callbacks or [])
    trainer = build_trainer(cfg, loggers, callbacks)

    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=str(resume.path) if resume else None)
        # Final metrics come from the final weights (the best checkpoint by val loss is kept as well).
        results = trainer.validate(task, datamodule=datamodule, verbose=False)[0]
        if cfg.run_test and datamodule.has_test:
            results |= trainer.test(task, datamodule=datamodule, verbose=False)[0]
    except BaseException as error:
        stopped = next((c.stopped for c in callbacks if getattr(c, "stopped", None)), None)
        close_loggers(loggers, status="preempted" if stopped else "failed")
        end_job(trainer, failed=True)
        if stopped:
            raise stopped from error
        raise
    try:
        return finish(cfg, trainer, results, datamodule, callbacks)
    finally:
        end_job(trainer)  # the next job of a multirun starts its own ranks and process group


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
