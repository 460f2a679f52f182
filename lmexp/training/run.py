"""One training job, top to bottom: settings, data, task, loggers, Trainer, fit, test, metrics.json.

``python -m lmexp.train`` (lmexp/train.py) calls :func:`train` with the composed config; sweeps call it once
per point. Heavy imports (torch, Lightning, torchmetrics) happen inside, so ``--help`` answers at once.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


def train(cfg: DictConfig, extra_callbacks: list[Any] | None = None) -> dict[str, float]:
    """Run one training job described by ``cfg``; return the final metrics (also in metrics.json).

    The run holds its run dir for its whole length (lmexp/training/run_lock.py): a second run on the same
    dir stops at once, naming this one.
    """
    from lmexp.training.run_lock import holding

    with holding(cfg.paths.run_dir):
        return _train(cfg, extra_callbacks)


def _train(cfg: DictConfig, extra_callbacks: list[Any] | None) -> dict[str, float]:
    from lmexp.config.settings import load_settings
    from lmexp.training.build import (
        adopt_pretrained,
        build_callbacks,
        build_datamodule,
        build_loggers,
        build_task,
        build_trainer,
        load_pretrained,
    )
    from lmexp.training.distributed import end_job
    from lmexp.training.loggers import close_loggers, wandb_run_id
    from lmexp.training.resume import carry_log_rows, check_fits_run, log_rows_before, resolve_resume

    pretrained = load_pretrained(cfg)  # init_from: the pre-trained model's settings, weights and tokenizer
    cfg = adopt_pretrained(cfg, pretrained)
    settings = load_settings(cfg, pretrained)  # every config error, in one line, before any data work
    resume = resolve_resume(cfg)  # ckpt_path, or resume=auto: verified before any data work too

    import lightning.pytorch as pl

    quiet_lightning()
    pl.seed_everything(settings.run.seed, workers=True, verbose=False)
    datamodule = build_datamodule(settings, cfg.paths.cache_dir, pretrained)
    datamodule.prepare()
    task = build_task(settings, cfg, datamodule, pretrained)
    if resume:
        check_fits_run(resume, task, datamodule.tokenizer)
    carried_rows = log_rows_before(resume, cfg)  # read before the CSV logger replaces the file
    loggers = build_loggers(cfg, wandb_run_id=resume.wandb_run_id if resume else None)
    if pl.utilities.rank_zero_only.rank == 0:  # other ranks' loggers are placeholders that write nothing
        carry_log_rows(loggers, carried_rows)
    task.checkpoint_extras["wandb_run_id"] = wandb_run_id(loggers)
    callbacks = build_callbacks(cfg, settings, loggers) + list(extra_callbacks or [])
    trainer = build_trainer(settings, cfg, loggers, callbacks)

    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=str(resume.path) if resume else None)
        # An Optuna trial its pruner stopped (lmexp/sweeps/pruning.py) is not evaluated any further.
        pruned = next((c.pruned for c in callbacks if getattr(c, "pruned", None)), None)
        if pruned is None:
            # Final metrics come from the final weights (the best checkpoint by val loss is kept as well).
            results = trainer.validate(task, datamodule=datamodule, verbose=False)[0]
            if settings.run.run_test and datamodule.has_test:
                results |= trainer.test(task, datamodule=datamodule, verbose=False)[0]
    except BaseException as error:
        stopped = next((c.stopped for c in callbacks if getattr(c, "stopped", None)), None)
        try:
            close_loggers(loggers, status="preempted" if stopped else "failed")
        except Exception as closing:  # noqa: BLE001 - e.g. the CSV log on the full disk that stopped the run
            logging.getLogger(__name__).warning("the loggers could not be closed: %s", closing)
        end_job(trainer, failed=True)
        if stopped:
            raise stopped from error
        raise
    if pruned is not None:
        close_loggers(loggers)  # a pruned trial ended as its sweep decided: not a failure
        end_job(trainer)
        raise pruned
    try:
        return finish(cfg, trainer, results, datamodule, callbacks)
    finally:
        end_job(trainer)  # the next job of a multirun starts its own ranks and process group


def collect_metrics(
    trainer: Any, results: dict[str, Any], callbacks: list[Any], datamodule: Any
) -> dict[str, float]:
    """The flat ``<split>/<name>`` metrics of the run, as plain floats."""
    metrics = {key: float(value) for key, value in results.items() if key.startswith(("val/", "test/"))}
    if datamodule.bpw_floor is not None and "val/bpw" in metrics:
        metrics["val/bpw_floor"] = float(datamodule.bpw_floor)
        if "test/bpw" in metrics:
            metrics["test/bpw_floor"] = float(datamodule.bpw_floor)
    for callback in callbacks:
        if hasattr(callback, "perf_metrics"):
            metrics.update(callback.perf_metrics())
        if hasattr(callback, "summary_metrics"):  # e.g. the harness callback's latest scores
            metrics.update(callback.summary_metrics())
    metrics["perf/global_step"] = float(trainer.global_step)
    counts = getattr(trainer.lightning_module, "parameter_counts", None) or {}
    metrics.update({name: float(count) for name, count in counts.items()})
    return dict(sorted(metrics.items()))


def finish(
    cfg: DictConfig, trainer: Any, results: dict[str, Any], datamodule: Any, callbacks: list[Any]
) -> dict[str, float]:
    """Write metrics.json (rank 0), print the summary, close the loggers; return the metrics."""
    from lmexp.cache import atomic_write_json
    from lmexp.training.loggers import close_loggers, is_wandb
    from lmexp.training.summary import print_summary

    metrics = collect_metrics(trainer, results, callbacks, datamodule)
    run_dir = Path(cfg.paths.run_dir)
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "metrics.json", metrics)
        for logger in trainer.loggers:
            if is_wandb(logger):
                logger.experiment.summary.update(metrics)
        print_summary(metrics, run_dir, cfg)
    close_loggers(trainer.loggers)
    return metrics


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_lightning() -> None:
    """Lightning's log lines once (through Hydra's handlers, into the console and the run's log file)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()  # Hydra's root handler prints them; Lightning's own would print twice
        logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # Lightning suggests srun whenever SLURM's tools are installed, also for runs meant to be local.
    warnings.filterwarnings("ignore", message=r".*The `srun` command is available")
    # A non-finite loss is reported by lmexp.training.guards.NonFiniteGuard, in one line naming the step.
    warnings.filterwarnings("ignore", message=r"Encountered `nan` values in tensor")
    # Split metrics are torchmetrics objects, synced across ranks when computed: no sync_dist needed.
    warnings.filterwarnings("ignore", message=r".*self\.log\(.*sync_dist=True\)")
