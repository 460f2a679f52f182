"""A run's objects from its typed settings: the data module, the task around its model, loggers, callbacks,
and the Trainer. Each builder reads its groups from :class:`lmexp.config.settings.RunSettings` (parsed once)
and asks the model registry and the task class, never a class name.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from lmexp.config.settings import RunSettings, target_class
from lmexp.data.context import DataContext
from lmexp.errors import ConfigError
from lmexp.tasks.base import TaskInputs
from lmexp.training.secrets import redact

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- init_from
@dataclass
class Pretrained:
    """The run a fine-tuning job starts from (``init_from``): its checkpoint, loaded once."""

    path: Path
    checkpoint: dict[str, Any]

    @property
    def run(self) -> dict[str, Any]:
        """What lmexp keeps in a checkpoint: the run's config, model config, tokenizer..."""
        return self.checkpoint["lmexp"]

    @property
    def tokenizer_bytes(self) -> bytes:
        return self.run["tokenizer_model"].numpy().tobytes()

    def has_token(self, piece: str) -> bool:
        """Whether the run's tokenizer has ``piece`` as a token of its own."""
        import sentencepiece as spm

        processor = spm.SentencePieceProcessor(model_proto=self.tokenizer_bytes)
        return processor.piece_to_id(piece) != processor.unk_id()


def load_pretrained(cfg: DictConfig) -> Pretrained | None:
    """The ``init_from`` run of a fine-tuning job (None otherwise); a run dir stands for its last.ckpt."""
    from lmexp.training.checkpoints import checkpoint_of, load_checkpoint

    if not cfg.get("init_from") or not _fine_tuning(cfg):
        return None
    path = checkpoint_of(cfg.init_from)
    return Pretrained(path, load_checkpoint(path, key="init_from"))


def adopt_pretrained(cfg: DictConfig, pretrained: Pretrained | None) -> DictConfig:
    """``cfg`` with the pre-trained run's model and tokenizer settings (a copy; ``cfg`` is not changed), so
    the run's own config, logs and checkpoints describe the model that is really trained."""
    if pretrained is None:
        return cfg
    adopted = copy.deepcopy(cfg)
    with open_dict(adopted):
        adopted.model = OmegaConf.create(pretrained.run["config"]["model"])
        adopted.tokenizer = OmegaConf.create(pretrained.run["config"]["tokenizer"])
    return adopted


def _fine_tuning(cfg: DictConfig) -> bool:
    try:
        return bool(target_class(cfg.task, "task").task_type().fine_tuning)
    except (ConfigError, AttributeError):
        return False  # a bad task config is reported with the other problems by load_settings


# ------------------------------------------------------------------------------------------------ data
def build_datamodule(
    settings: RunSettings, cache_dir: str | Path, pretrained: Pretrained | None = None, **context: Any
) -> Any:
    """The data module of ``settings.data`` for the run's task and model kind (it reads nothing yet).

    ``context``: further :class:`~lmexp.data.context.DataContext` values (a checkpoint's labels and
    tokenizer, for evaluation).
    """
    task_class = settings.task_class
    values = {
        "tokenizer": settings.tokenizer.with_task_tokens(
            task_class.special_tokens, task_class.tokenizer_pieces
        ),
        "cache_dir": Path(str(cache_dir)).expanduser(),
        "seed": settings.run.seed,
        "example_format": task_class.data_format,
        "layout": settings.model_spec.layout,
        "tokenizer_model": pretrained.tokenizer_bytes if pretrained is not None else None,
        **task_class.data_options(settings.task),
        **context,
    }
    return settings.data.build(DataContext(**values))


# ------------------------------------------------------------------------------------------------ task
def sized_model_config(model_config: Any, vocab_size: int) -> Any:
    """The model config with the tokenizer's vocabulary size filled in (null = the tokenizer's)."""
    if model_config.vocab_size is None:
        return replace(model_config, vocab_size=vocab_size)
    if model_config.vocab_size < vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_config.vocab_size} is smaller than the tokenizer's "
            f"{vocab_size}; set model.vocab_size=null"
        )
    return model_config


def build_task(
    settings: RunSettings, cfg: DictConfig, datamodule: Any, pretrained: Pretrained | None = None
) -> Any:
    """The task's LightningModule around a fresh model sized to the tokenizer (or the pre-trained one's)."""
    import torch

    tokenizer = datamodule.tokenizer
    model_config = sized_model_config(settings.model, tokenizer.vocab_size)
    task_class = settings.task_class
    labels = datamodule.labels if task_class.fine_tuning else None
    inputs = TaskInputs(
        tokenizer,
        labels=labels,
        bpw_floor=datamodule.bpw_floor,
        seed=settings.run.seed,
        sources=list(getattr(datamodule, "source_names", [])),
    )
    task = task_class.build(
        settings.task,
        model_config.build(),
        inputs,
        optimizer=settings.optim,
        scheduler=settings.scheduler,
        compile=settings.run.compile,
    )
    if pretrained is not None:  # fine-tuning: pre-trained backbone, fresh head
        task.load_pretrained(pretrained.checkpoint["state_dict"])
    task.checkpoint_extras = {
        "config": redact(OmegaConf.to_container(cfg, resolve=True)),
        "model_kind": settings.model_spec.kind,
        "task": task_class.name,
        "model_config": model_config.to_dict(),
        "tokenizer_model": torch.frombuffer(bytearray(tokenizer.path.read_bytes()), dtype=torch.uint8),
        **({"labels": list(labels)} if labels is not None else {}),
    }
    return task


# ------------------------------------------------------------------------------------ loggers, callbacks
def build_loggers(cfg: DictConfig, wandb_run_id: str | None = None) -> list[Any]:
    """The configured loggers, with the run's config logged; ``wandb_run_id`` continues that W&B run."""
    from lmexp.training.loggers import is_wandb, start_resumed_wandb_run

    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if not node:
            continue
        resume = {"id": wandb_run_id, "resume": "allow"} if name == "wandb" and wandb_run_id else {}
        loggers.append(hydra.utils.instantiate(node, **resume))
    config = redact(OmegaConf.to_container(cfg, resolve=True))
    for logger in loggers:
        if wandb_run_id and is_wandb(logger):
            start_resumed_wandb_run(logger)
        logger.log_hyperparams(config)
    return loggers


def build_callbacks(cfg: DictConfig, settings: RunSettings, loggers: list[Any]) -> list[Any]:
    """The ``callbacks`` group's callbacks, and the guards every run has."""
    from lmexp.sweeps.pruning import pruning_callback
    from lmexp.training.guards import NonFiniteGuard, Preemption
    from lmexp.training.resume import LogRowsInCheckpoint

    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if not node:
            continue
        if name == "lr_monitor" and not loggers:
            continue  # LearningRateMonitor refuses to run without a logger
        callbacks.append(hydra.utils.instantiate(node))
    # Always on: together they cost one scalar read per step and keep the run's state safe.
    callbacks += [NonFiniteGuard(skip=settings.trainer.skip_nonfinite), Preemption(), LogRowsInCheckpoint()]
    pruning = pruning_callback(settings.run.objective)  # a trial of a pruning Optuna sweep
    return callbacks + ([pruning] if pruning else [])


def build_trainer(settings: RunSettings, cfg: DictConfig, loggers: list[Any], callbacks: list[Any]) -> Any:
    """The Lightning Trainer; its ranks 1..n-1 (if it starts any) run this job's config."""
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.pytorch.callbacks import ProgressBar

    from lmexp.training.checkpoints import AtomicCheckpointIO
    from lmexp.training.distributed import use_rank_launcher

    # Under SLURM, Lightning's cluster environment without its auto-requeue: lmexp's Preemption callback
    # checkpoints at a batch boundary and requeues instead.
    slurm = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
    trainer = settings.trainer.build(
        logger=loggers or False,
        callbacks=callbacks,
        default_root_dir=cfg.paths.run_dir,
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
        plugins=[AtomicCheckpointIO(), *slurm],
    )
    use_rank_launcher(trainer, cfg)
    return trainer


def build_run(cfg: DictConfig) -> tuple[RunSettings, Any, Any]:
    """The settings, the prepared data module and the task of ``cfg``, as a training run builds them (for
    tools that drive the model themselves: benchmarks, inspection)."""
    from lmexp.config.settings import load_settings

    pretrained = load_pretrained(cfg)
    cfg = adopt_pretrained(cfg, pretrained)
    settings = load_settings(cfg, pretrained)
    datamodule = build_datamodule(settings, cfg.paths.cache_dir, pretrained)
    datamodule.prepare()
    return settings, datamodule, build_task(settings, cfg, datamodule, pretrained)
