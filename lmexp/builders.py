"""Turn a composed config into the objects of a run: checks, data, task, loggers, callbacks, trainer.

Each builder reads one config group, so ``conf/<group>/`` and the code it reaches are one hop apart.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lmexp.checkpoints import load_checkpoint
from lmexp.errors import ConfigError

PRECISIONS = (
    "64-true", "32-true", "16-true", "16-mixed", "bf16-true", "bf16-mixed",
    "64", "32", "16", "bf16", 64, 32, 16,
)  # fmt: skip


# ------------------------------------------------------------------------------------------- checks
def build_config_object(node: DictConfig, key: str, **overrides: Any) -> Any:
    """Instantiate a config dataclass from ``node`` (its ``_target_``), naming unknown keys as ``key.x``."""
    target = hydra.utils.get_class(node["_target_"])
    values = OmegaConf.to_container(node, resolve=True)
    values.pop("_target_")
    values.update(overrides)
    if dataclasses.is_dataclass(target):
        known = {field.name for field in dataclasses.fields(target)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                [
                    f"{key}.{name} is not a setting of {target.__name__} (known: {', '.join(sorted(known))})"
                    for name in unknown
                ]
            )
    return target(**values)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _collect(problems: list[str], build: Any) -> Any:
    try:
        return build()
    except ConfigError as error:
        problems.extend(error.problems)
        return None


def check_config(cfg: DictConfig) -> None:
    """Validate every group before any data work; raise one ConfigError listing all problems."""
    problems: list[str] = []
    model = _collect(problems, lambda: build_config_object(cfg.model, "model"))
    _collect(problems, lambda: build_config_object(cfg.tokenizer, "tokenizer"))
    _collect(problems, lambda: _data_settings(cfg))
    problems += _optimizer_problems(cfg) + _scheduler_problems(cfg) + _trainer_problems(cfg)
    if not _is_int(cfg.seed):
        problems.append(f"seed={cfg.seed!r}: expected an integer")
    problems += _task_problems(cfg)
    block_size = cfg.data.get("block_size")
    max_seq_len = getattr(model, "max_seq_len", None)
    if _is_int(block_size) and _is_int(max_seq_len) and block_size > max_seq_len:
        problems.append(f"data.block_size={block_size} exceeds model.max_seq_len={max_seq_len}")
    if problems:
        raise ConfigError(problems)


def _choice(group: str, fallback: str) -> str:
    """The option picked for ``group`` (e.g. ``bert`` for model), as the user typed it."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return str(HydraConfig.get().runtime.choices[group])
    except (ValueError, KeyError, AttributeError):
        return fallback


def _task_problems(cfg: DictConfig) -> list[str]:
    """The model must support the task, and the task's own settings must be valid."""
    task_cls = hydra.utils.get_class(cfg.task._target_)
    model_cls = hydra.utils.get_class(cfg.model._target_)
    supported = getattr(model_cls, "supported_tasks", ())
    if task_cls.task_name not in supported:
        return [
            f"task={_choice('task', task_cls.task_name)} is not supported by "
            f"model={_choice('model', model_cls.__name__)} (it supports task={' or task='.join(supported)})"
        ]
    return task_cls.check_settings(cfg)


def _data_settings(cfg: DictConfig) -> Any:
    # Constructing the data module checks its settings only; it touches no file until prepare().
    return build_datamodule(cfg)


def _optimizer_problems(cfg: DictConfig) -> list[str]:
    optim, problems = cfg.optim, []
    lr = optim.get("lr")
    if not _is_number(lr) or lr <= 0:
        problems.append(f"optim.lr={lr!r}: expected a positive number")
    weight_decay = optim.get("weight_decay", 0.0)
    if not _is_number(weight_decay) or weight_decay < 0:
        problems.append(f"optim.weight_decay={weight_decay!r}: expected a number >= 0")
    betas = optim.get("betas")
    if betas is not None and (len(betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in betas)):
        problems.append(f"optim.betas={list(betas)!r}: expected two numbers in [0, 1)")
    return problems


def _scheduler_problems(cfg: DictConfig) -> list[str]:
    scheduler, problems = cfg.get("scheduler"), []
    if not scheduler:
        return problems
    warmup = scheduler.get("warmup_steps", 0)
    if not _is_int(warmup) or warmup < 0:
        problems.append(f"scheduler.warmup_steps={warmup!r}: expected an integer >= 0")
    ratio = scheduler.get("min_lr_ratio", 0.0)
    if not _is_number(ratio) or not 0 <= ratio <= 1:
        problems.append(f"scheduler.min_lr_ratio={ratio!r}: expected a number in [0, 1]")
    return problems


def _trainer_problems(cfg: DictConfig) -> list[str]:
    trainer, problems = cfg.trainer, []
    if trainer.get("precision") not in PRECISIONS:
        allowed = ", ".join(p for p in PRECISIONS if isinstance(p, str) and "-" in p)
        problems.append(f"trainer.precision={trainer.get('precision')!r} is not one of {allowed}")
    max_steps = trainer.get("max_steps", -1)
    if not _is_int(max_steps) or (max_steps < 1 and max_steps != -1):
        problems.append(f"trainer.max_steps={max_steps!r}: expected a positive integer (or -1)")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and (not _is_number(clip) or clip < 0):
        problems.append(f"trainer.gradient_clip_val={clip!r}: expected a number >= 0 or null")
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if not _is_int(accumulate) or accumulate < 1:
        problems.append(f"trainer.accumulate_grad_batches={accumulate!r}: expected a positive integer")
    return problems


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from, verified to exist and to load, or None."""
    if not cfg.get("ckpt_path"):
        return None
    path = Path(str(cfg.ckpt_path)).expanduser()
    load_checkpoint(path)
    return str(path)


# --------------------------------------------------------------------------------------------- build
def build_datamodule(cfg: DictConfig) -> Any:
    task_cls = hydra.utils.get_class(cfg.task._target_)
    tokenizer = build_config_object(cfg.tokenizer, "tokenizer")
    # The task's own special tokens ([CLS], [SEP], [MASK] for MLM) are reserved in the tokenizer.
    extra = list(tokenizer.extra_special_tokens)
    tokenizer.extra_special_tokens = extra + [t for t in task_cls.special_tokens if t not in extra]
    for key, piece in task_cls.tokenizer_pieces.items():  # e.g. [PAD] and [UNK] for masked LM
        setattr(tokenizer, key, piece)
    # Partial first: instantiate() would turn a dataclass passed as a kwarg into a plain dict.
    make = hydra.utils.instantiate(cfg.data, _convert_="all", _partial_=True)
    return make(
        tokenizer=tokenizer,
        cache_dir=cfg.paths.cache_dir,
        seed=cfg.seed,
        example_format=task_cls.data_format,
        nsp=bool(cfg.task.get("nsp", False)),
    )


def build_task(cfg: DictConfig, datamodule: Any) -> Any:
    """The LightningModule of ``cfg.task`` around a fresh model sized to the tokenizer."""
    import torch

    tokenizer = datamodule.tokenizer
    model_config = build_config_object(cfg.model, "model")
    if model_config.vocab_size is None:
        model_config.vocab_size = tokenizer.vocab_size
    elif model_config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_config.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size}; set model.vocab_size=null"
        )
    model = model_config.build()
    scheduler = hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    task = hydra.utils.instantiate(
        cfg.task,
        model=model,
        optimizer=hydra.utils.instantiate(cfg.optim),
        scheduler=scheduler,
        vocab_size=tokenizer.vocab_size,
        compile=cfg.compile,
        bpw_floor=datamodule.bpw_floor,
        **hydra.utils.get_class(cfg.task._target_).builder_kwargs(tokenizer, cfg),
    )
    task.checkpoint_extras = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "model_config": dataclasses.asdict(model_config),
        "tokenizer_model": torch.frombuffer(bytearray(tokenizer.path.read_bytes()), dtype=torch.uint8),
    }
    return task


def build_loggers(cfg: DictConfig) -> list[Any]:
    loggers = [hydra.utils.instantiate(node) for node in (cfg.get("logger") or {}).values() if node]
    config = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(config)
    return loggers


def build_callbacks(cfg: DictConfig, loggers: list[Any]) -> list[Any]:
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if not node:
            continue
        if name == "lr_monitor" and not loggers:
            continue  # LearningRateMonitor refuses to run without a logger
        callbacks.append(hydra.utils.instantiate(node))
    return callbacks


def build_trainer(cfg: DictConfig, loggers: list[Any], callbacks: list[Any]) -> Any:
    has_bar = any(type(c).__name__.endswith("ProgressBar") for c in callbacks)
    return hydra.utils.instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=callbacks,
        default_root_dir=cfg.paths.run_dir,
        enable_progress_bar=has_bar,
    )


# -------------------------------------------------------------------------------------------- finish
class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_lightning() -> None:
    """Lightning's log lines once (through Hydra's handlers, into the console and the run's log file)."""
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()  # Hydra's root handler prints them; Lightning's own would print twice
        logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


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
    metrics["perf/global_step"] = float(trainer.global_step)
    return dict(sorted(metrics.items()))


def finish(
    cfg: DictConfig, trainer: Any, results: dict[str, Any], datamodule: Any, callbacks: list[Any]
) -> dict[str, float]:
    """Write metrics.json (rank 0), print the summary, close the loggers; return the metrics."""
    from lmexp.cache import atomic_write_json
    from lmexp.summary import print_summary

    metrics = collect_metrics(trainer, results, callbacks, datamodule)
    run_dir = Path(cfg.paths.run_dir)
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "metrics.json", metrics)
        for logger in trainer.loggers:
            if hasattr(logger, "experiment") and type(logger).__name__ == "WandbLogger":
                logger.experiment.summary.update(metrics)
        print_summary(metrics, run_dir, cfg)
    close_loggers(trainer.loggers)
    return metrics


def close_loggers(loggers: list[Any], status: str = "success") -> None:
    """Finalize every logger; finish the W&B run so a later job in this process starts its own."""
    for logger in loggers:
        logger.finalize(status)
    if any(type(logger).__name__ == "WandbLogger" for logger in loggers):
        import wandb

        wandb.finish(exit_code=0 if status == "success" else 1)
