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

from lmexp.errors import ConfigError
from lmexp.resume import resume_problems
from lmexp.secrets import redact

# Trainer settings of lmexp's own, taken out before the rest goes to lightning.pytorch.Trainer.
LMEXP_TRAINER_KEYS = ("skip_nonfinite",)

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
    problems += _task_problems(cfg) + resume_problems(cfg)
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
    if getattr(task_cls, "supported_models", None):
        return _fine_tuning_problems(cfg, task_cls) or task_cls.check_settings(cfg)
    if cfg.get("init_from"):
        return [
            f"init_from={cfg.init_from}: only fine-tuning tasks (task=classify, task=ner) start from "
            "pre-trained weights; to continue a run, use ckpt_path"
        ]
    model_cls = hydra.utils.get_class(cfg.model._target_)
    supported = getattr(model_cls, "supported_tasks", ())
    if task_cls.task_name not in supported:
        return [
            f"task={_choice('task', task_cls.task_name)} is not supported by "
            f"model={_choice('model', model_cls.__name__)} (it supports task={' or task='.join(supported)})"
        ]
    return task_cls.check_settings(cfg)


def _is_labelled_data(cfg: DictConfig) -> bool:
    from lmexp.data.labelled import LabelledData

    data_cls = hydra.utils.get_class(cfg.data._target_)
    return isinstance(data_cls, type) and issubclass(data_cls, LabelledData)


def init_checkpoint_path(cfg: DictConfig) -> Path:
    """``init_from`` as a checkpoint: a run dir (one with ``checkpoints/``) stands for its ``last.ckpt``."""
    path = Path(str(cfg.init_from)).expanduser()
    return path / "checkpoints" / "last.ckpt" if (path / "checkpoints").is_dir() else path


_init_cache: dict[str, dict[str, Any]] = {}


def init_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """The checkpoint ``init_from`` names, loaded once per process (checks and builders all read it)."""
    from lmexp.checkpoints import load_checkpoint

    path = str(init_checkpoint_path(cfg))
    if path not in _init_cache:
        _init_cache.clear()  # keep at most one checkpoint in memory
        _init_cache[path] = load_checkpoint(path, key="init_from")
    return _init_cache[path]


def _init_model_target(cfg: DictConfig) -> str:
    """The model class a run builds: the ``init_from`` checkpoint's, or the config's."""
    if cfg.get("init_from"):
        return str(init_checkpoint(cfg)["lmexp"]["config"]["model"]["_target_"])
    return str(cfg.model._target_)


def _fine_tuning_problems(cfg: DictConfig, task_cls: Any) -> list[str]:
    """Labelled data, a model family the task can fine-tune, and an ``init_from`` that fits.

    With ``init_from`` the run adopts the checkpoint's model and tokenizer settings (``cfg.model`` and
    ``cfg.tokenizer`` are replaced), so the run's own config, logs and checkpoints describe the model
    that is really trained.
    """
    task = _choice("task", task_cls.task_name)
    if not _is_labelled_data(cfg):
        data = "data=jsonl or data=conll" if task_cls.data_format == "ner" else "data=jsonl"
        return [f"task={task} reads labelled examples: add {data} with data.train_path and data.val_path"]
    model_cls = hydra.utils.get_class(_init_model_target(cfg))
    where = f"init_from={cfg.init_from}" if cfg.get("init_from") else f"model={_choice('model', '')}"
    if model_cls.__name__ not in task_cls.supported_models:
        return [f"{where}: a {model_cls.__name__} model cannot be fine-tuned for task={task}"]
    if not cfg.get("init_from"):
        return []
    checkpoint = init_checkpoint(cfg)
    run = checkpoint["lmexp"]
    problems = _init_tokenizer_problems(run, model_cls, where)
    max_seq_len = run["model_config"].get("max_seq_len")
    block_size = cfg.data.get("block_size")
    if _is_int(max_seq_len) and _is_int(block_size) and block_size > max_seq_len:
        problems.append(f"data.block_size={block_size} exceeds max_seq_len={max_seq_len} of {where}")
    if not problems:
        from omegaconf import open_dict

        with open_dict(cfg):
            cfg.model = OmegaConf.create(run["config"]["model"])
            cfg.tokenizer = OmegaConf.create(run["config"]["tokenizer"])
    return problems


def _init_tokenizer_problems(run: dict[str, Any], model_cls: type, where: str) -> list[str]:
    """A BERT classifier reads the pooled [CLS] of ``[CLS] text [SEP]``: its tokenizer needs both."""
    if model_cls.__name__ != "BERTConfig":
        return []
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=run["tokenizer_model"].numpy().tobytes())
    missing = [t for t in ("[CLS]", "[SEP]") if processor.piece_to_id(t) == processor.unk_id()]
    if missing:
        return [f"{where}: its tokenizer has no {' or '.join(missing)} token, which a BERT classifier needs"]
    return []


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
    from lmexp.strategies import strategy_problems

    return problems + strategy_problems(trainer.get("strategy"))


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
        **(_labelled_data_kwargs(cfg) if _is_labelled_data(cfg) else {}),
    )


def _labelled_data_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tuning data follows the model (BERT reads ``[CLS] text [SEP]``); init_from brings a tokenizer."""
    bert = _init_model_target(cfg).endswith("BERTConfig")
    kwargs: dict[str, Any] = {"layout": "cls_sep" if bert else "eos"}
    if cfg.get("init_from"):
        kwargs["tokenizer_model"] = init_checkpoint(cfg)["lmexp"]["tokenizer_model"].numpy().tobytes()
    return kwargs


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
    task_cls = hydra.utils.get_class(cfg.task._target_)
    # Fine-tuning tasks take their label set from the data.
    data_kwargs = task_cls.data_kwargs(datamodule) if hasattr(task_cls, "data_kwargs") else {}
    task = hydra.utils.instantiate(
        cfg.task,
        model=model,
        optimizer=hydra.utils.instantiate(cfg.optim),
        scheduler=scheduler,
        vocab_size=tokenizer.vocab_size,
        compile=cfg.compile,
        bpw_floor=datamodule.bpw_floor,
        **hydra.utils.get_class(cfg.task._target_).builder_kwargs(tokenizer, cfg),
        **data_kwargs,
    )
    if cfg.get("init_from"):  # fine-tuning: pre-trained backbone, fresh head
        task.load_backbone(init_checkpoint(cfg)["state_dict"])
    task.checkpoint_extras = {
        "config": redact(OmegaConf.to_container(cfg, resolve=True)),
        "model_config": dataclasses.asdict(model_config),
        "tokenizer_model": torch.frombuffer(bytearray(tokenizer.path.read_bytes()), dtype=torch.uint8),
        **({"labels": data_kwargs["labels"]} if "labels" in data_kwargs else {}),
    }
    return task


def build_loggers(cfg: DictConfig, wandb_run_id: str | None = None) -> list[Any]:
    """The configured loggers, with the run's config logged; ``wandb_run_id`` continues that W&B run."""
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if not node:
            continue
        resume = {"id": wandb_run_id, "resume": "allow"} if name == "wandb" and wandb_run_id else {}
        loggers.append(hydra.utils.instantiate(node, **resume))
    config = redact(OmegaConf.to_container(cfg, resolve=True))
    for logger in loggers:
        if wandb_run_id and type(logger).__name__ == "WandbLogger":
            _start_resumed_wandb_run(logger)
        logger.log_hyperparams(config)
    return loggers


def _start_resumed_wandb_run(logger: Any, attempts: int = 15) -> None:
    """Open the W&B run a resumed job continues; if a killed predecessor still holds it, start a new one.

    After ``kill -9`` of the training process alone, its W&B service process can live on and keep the run
    open; W&B then refuses the id ("run ID ... is in use"). Wait a little for it to exit, then log to a
    fresh W&B run rather than fail the resumed training.
    """
    import time

    log = logging.getLogger(__name__)
    run_id = logger.version
    for attempt in range(attempts):
        try:
            logger.experiment  # noqa: B018 - opens the run
            return
        except Exception as error:
            if "is in use" not in str(error):
                raise
            if attempt == 0:
                log.info("W&B run %s is still held by the stopped job; waiting for it", run_id)
            logger._experiment = None
            time.sleep(1.0)
    log.warning("W&B run %s is still held by the stopped job; logging to a new W&B run", run_id)
    logger._wandb_init["id"], logger._id = None, None
    logger.experiment  # noqa: B018


def wandb_run_id(loggers: list[Any]) -> str | None:
    """The id of the run's W&B run (kept in checkpoints, so a resumed run continues it)."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            return str(logger.version)
    return None


def build_callbacks(cfg: DictConfig, loggers: list[Any]) -> list[Any]:
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if not node:
            continue
        if name == "lr_monitor" and not loggers:
            continue  # LearningRateMonitor refuses to run without a logger
        callbacks.append(hydra.utils.instantiate(node))
    from lmexp.guards import NonFiniteGuard, Preemption
    from lmexp.resume import LogRowsInCheckpoint

    # Always on: together they cost one scalar read per step and keep the run's state safe.
    skip_nonfinite = bool(cfg.trainer.get("skip_nonfinite", False))
    callbacks += [NonFiniteGuard(skip=skip_nonfinite), Preemption(), LogRowsInCheckpoint()]
    return callbacks


def build_trainer(cfg: DictConfig, loggers: list[Any], callbacks: list[Any]) -> Any:
    from lmexp.guards import AtomicCheckpointIO

    has_bar = any(type(c).__name__.endswith("ProgressBar") for c in callbacks)
    trainer_cfg = OmegaConf.masked_copy(cfg.trainer, [k for k in cfg.trainer if k not in LMEXP_TRAINER_KEYS])
    trainer = hydra.utils.instantiate(
        trainer_cfg,
        logger=loggers or False,
        callbacks=callbacks,
        default_root_dir=cfg.paths.run_dir,
        enable_progress_bar=has_bar,
        plugins=[AtomicCheckpointIO(), *_slurm_plugins()],
    )
    from lmexp.strategies import use_rank_launcher

    use_rank_launcher(trainer, cfg)  # ranks 1..n-1 run this job's config, not a fresh Hydra command line
    return trainer


def _slurm_plugins() -> list[Any]:
    """Under SLURM, Lightning's cluster environment without its auto-requeue (lmexp.guards.Preemption
    checkpoints at a batch boundary and requeues instead)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


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
    # Lightning suggests srun whenever SLURM's tools are installed, also for runs meant to be local.
    warnings.filterwarnings("ignore", message=r".*The `srun` command is available")
    # A non-finite loss is reported by lmexp.guards.NonFiniteGuard, in one line naming the step.
    warnings.filterwarnings("ignore", message=r"Encountered `nan` values in tensor")
    # Split metrics are torchmetrics objects, synced across ranks when computed: no sync_dist needed.
    warnings.filterwarnings("ignore", message=r".*self\.log\(.*sync_dist=True\)")


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

        if status == "preempted" and wandb.run is not None:
            wandb.run.mark_preempting()  # shown as preempted, not crashed; the resumed run continues it
        wandb.finish(exit_code=0 if status == "success" else 1)
