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

from lmexp.config.settings import RunSettings
from lmexp.data.context import DataContext
from lmexp.errors import ConfigError
from lmexp.tasks.base import TaskInputs
from lmexp.training.secrets import redact

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- init_from
HF_PREFIX = "hf:"  # init_from=hf:<dir or hub id>: a Hugging Face model imported into lmexp's own kind


@dataclass
class Pretrained:
    """The model a run starts from (``init_from``), loaded once: an lmexp run's checkpoint, or a Hugging Face
    GPT-2, BERT or Llama imported into lmexp's ``gpt``, ``bert`` or ``llama`` (``hf:<dir or id>``).

    The run adopts its model config and its tokenizer; the task loads its weights (a fine-tuning task into the
    backbone under a fresh head, ``clm``/``mlm`` into the whole model).
    """

    source: str
    """``init_from`` as given."""
    model_node: dict[str, Any]
    """The model config of the pre-trained model (its ``_target_`` names the kind)."""
    state_dict: dict[str, Any]
    """Its weights, under the task's names (``model.*``)."""
    tokenizer_node: dict[str, Any] | None
    """The ``tokenizer`` settings of an lmexp run (None for an imported model: its tokenizer is its own)."""
    tokenizer: dict[str, Any]
    """``{"tokenizer_model": bytes | None, "tokenizer_dir": Path | None}`` (lmexp/data/tokenizer_store.py)."""
    fingerprint: str
    """Identifies the weights (recorded as a LoRA run's base, checked when it is restored)."""

    @property
    def tokenizer_bytes(self) -> bytes | None:
        """The sentencepiece model of an lmexp run (None: a Hugging Face tokenizer)."""
        return self.tokenizer["tokenizer_model"]

    def lacks_tokens(self, pieces: tuple[str, ...]) -> list[str]:
        """The special tokens among ``pieces`` (``[CLS]``, ``[SEP]``, ...) its tokenizer does not have."""
        if self.tokenizer["tokenizer_dir"] is not None:
            from lmexp.data.text_tokenizer import HFTokenizer

            return HFTokenizer.load(self.tokenizer["tokenizer_dir"]).missing(pieces)
        import sentencepiece as spm

        processor = spm.SentencePieceProcessor(model_proto=self.tokenizer_bytes)
        return [piece for piece in pieces if processor.piece_to_id(piece) == processor.unk_id()]

    def lacks_weight(self, name: str) -> bool:
        """Whether the model-level weight ``name`` (e.g. ``nsp_head.weight``) is not among its weights."""
        return f"model.{name}" not in self.state_dict and f"model.backbone.{name}" not in self.state_dict


def load_pretrained(cfg: DictConfig) -> Pretrained | None:
    """The ``init_from`` model of a run (None without one): a run dir (its last.ckpt), a ``.ckpt``, or
    ``hf:<dir or hub id>``."""
    if not cfg.get("init_from"):
        return None
    return load_init_from(str(cfg.init_from), Path(str(cfg.paths.cache_dir)).expanduser())


def load_init_from(source: str, cache_dir: Path) -> Pretrained:
    """The pre-trained model ``source`` names (an ``init_from`` value), loaded."""
    if source.startswith(HF_PREFIX):
        return _import_hf(source, cache_dir)
    return _load_run(source, cache_dir)


def _load_run(source: str, cache_dir: Path) -> Pretrained:
    from lmexp.data.tokenizer_store import tokenizer_source
    from lmexp.training.checkpoints import checkpoint_fingerprint, checkpoint_of, load_checkpoint

    path = checkpoint_of(source)
    checkpoint = load_checkpoint(path, key="init_from")
    run = checkpoint["lmexp"]
    return Pretrained(
        source=source,
        model_node=dict(run["config"]["model"]),
        state_dict=checkpoint["state_dict"],
        tokenizer_node=dict(run["config"]["tokenizer"]),
        tokenizer=tokenizer_source(run, cache_dir, key="init_from"),
        fingerprint=checkpoint_fingerprint(path),
    )


def _import_hf(source: str, cache_dir: Path) -> Pretrained:
    """A Hugging Face GPT-2, BERT or Llama as lmexp's own kind: its weights through the kind's adapter
    (lmexp/models/*_hf.py), its tokenizer as it is; every problem one line naming ``init_from``."""
    from lmexp.data.tokenizer_store import save_hf_tokenizer
    from lmexp.errors import CheckpointError
    from lmexp.models.hf import HFModelConfig, fingerprint
    from lmexp.models.hf_common import from_hf_model
    from lmexp.models.registry import MODELS

    name = source.removeprefix(HF_PREFIX)
    try:
        hf_model = HFModelConfig(name_or_path=name).transformers_model(weights=True, by_architecture=True)
        family, fields, state_dict = from_hf_model(hf_model)
        tokenizer_dir = save_hf_tokenizer(name, cache_dir)
    except (ConfigError, CheckpointError) as error:
        message = str(error).replace(f"model.name_or_path={name}", f"init_from={source}")
        raise type(error)(
            message if message.startswith("init_from") else f"init_from={source}: {message}"
        ) from None
    return Pretrained(
        source=source,
        model_node={"_target_": MODELS[family].config_class, **fields},
        state_dict={f"model.{key}": value for key, value in state_dict.items()},
        tokenizer_node=None,
        tokenizer={"tokenizer_model": None, "tokenizer_dir": tokenizer_dir},
        fingerprint=fingerprint(name),
    )


def adopt_pretrained(cfg: DictConfig, pretrained: Pretrained | None) -> DictConfig:
    """``cfg`` with the pre-trained model's settings (a copy; ``cfg`` is not changed), so the run's own
    config, logs and checkpoints describe the model that is really trained. ``model.lora`` stays the run's."""
    if pretrained is None:
        return cfg
    adopted = copy.deepcopy(cfg)
    lora = cfg.model.get("lora") if cfg.get("model") is not None else None
    with open_dict(adopted):
        adopted.model = OmegaConf.create(pretrained.model_node)
        if lora is not None:
            adopted.model.lora = copy.deepcopy(lora)
        if pretrained.tokenizer_node is not None:
            adopted.tokenizer = OmegaConf.create(pretrained.tokenizer_node)
    return adopted


# ------------------------------------------------------------------------------------------------ data
def model_layout(settings: RunSettings) -> str:
    """How labelled examples are framed for the run's model: its config's ``layout`` where it depends on
    the model loaded (model=hf), else its kind's."""
    return getattr(settings.model, "layout", None) or settings.model_spec.layout


def given_tokenizer(settings: RunSettings, cache_dir: Path, pretrained: Pretrained | None) -> dict[str, Any]:
    """The tokenizer the run is given rather than trains (DataContext's ``tokenizer_model`` /
    ``tokenizer_dir``): the pre-trained model's, or the model's own (model=hf); a Hugging Face one is checked
    for the special tokens the task needs, before any data work."""
    if pretrained is not None:
        given = dict(pretrained.tokenizer)
    elif settings.model_spec.own_tokenizer:  # the model's files are read here first: its problems, one line
        problems = settings.model.task_problems(settings.task_class.name)
        if problems:
            raise ConfigError(problems)
        given = {"tokenizer_model": None, "tokenizer_dir": settings.model.tokenizer_dir(cache_dir)}
    else:
        return {}
    if given["tokenizer_dir"] is not None:
        from lmexp.data.text_tokenizer import HFTokenizer

        tokenizer = HFTokenizer.load(given["tokenizer_dir"])
        problems = task_token_problems(tokenizer, settings, pretrained)
        if problems:
            raise ConfigError(problems)
    return given


def task_token_problems(tokenizer: Any, settings: RunSettings, pretrained: Pretrained | None) -> list[str]:
    """What a Hugging Face tokenizer lacks for the run's task, e.g. a mask token for task=mlm, a pad token to
    pad an encoder's batches; one problem naming the model and the tokens."""
    task_class, layout = settings.task_class, model_layout(settings)
    needed: list[str] = []
    if "[MASK]" in task_class.special_tokens:
        needed.append("[MASK]")  # masked LM replaces the selected tokens by it
    if layout == "cls_sep":
        needed += ["[CLS]", "[SEP]"]  # an encoder's example is [CLS] text [SEP]
        if task_class.data_format != "blocks":
            needed.append("[PAD]")  # decoders pad with eos (never attended by real positions, never scored)
    missing = tokenizer.missing(needed)
    if not missing:
        return []
    where = (
        f"init_from={pretrained.source}"
        if pretrained is not None
        else f"model.name_or_path={settings.model.name_or_path}"
    )
    return [
        f"the tokenizer of {where} has no {' and no '.join(m.removesuffix(' token') for m in missing)} "
        f"token{'s' if len(missing) > 1 else ''}, which task={task_class.name} needs; expected a tokenizer "
        f"with {', '.join(missing)}"
    ]


def build_datamodule(
    settings: RunSettings, cache_dir: str | Path, pretrained: Pretrained | None = None, **context: Any
) -> Any:
    """The data module of ``settings.data`` for the run's task and model kind (it reads nothing yet).

    ``context``: further :class:`~lmexp.data.context.DataContext` values (a checkpoint's labels and
    tokenizer, for evaluation).
    """
    task_class = settings.task_class
    cache = Path(str(cache_dir)).expanduser()
    values = {
        "tokenizer": settings.tokenizer.with_task_tokens(
            task_class.special_tokens, task_class.tokenizer_pieces
        ),
        "cache_dir": cache,
        "seed": settings.run.seed,
        "example_format": task_class.data_format,
        "layout": model_layout(settings),
        **given_tokenizer(settings, cache, pretrained),
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


def lora_base(settings: RunSettings, pretrained: Pretrained | None) -> dict[str, Any] | None:
    """What a LoRA run's adapters sit on, recorded in its checkpoints: the ``init_from`` model, or a
    pre-trained ``model=hf`` model (None when LoRA is off)."""
    if not settings.model.lora.enabled:
        return None
    if pretrained is not None:
        return {"init_from": pretrained.source, "fingerprint": pretrained.fingerprint}
    from lmexp.models.hf import fingerprint

    model = settings.model
    return {
        "hf": model.name_or_path,
        "revision": model.revision,
        "fingerprint": fingerprint(model.name_or_path),
    }


def parameter_counts(task: Any) -> dict[str, int]:
    """``model/params`` (every distinct parameter, a tied matrix once) and ``model/trainable_params`` (those
    that train: with LoRA the adapters and a fine-tuning head), for the log and metrics.json."""
    params = {id(p): p for p in task.model.parameters()}.values()
    return {
        "model/params": sum(p.numel() for p in params),
        "model/trainable_params": sum(p.numel() for p in params if p.requires_grad),
    }


def build_task(
    settings: RunSettings, cfg: DictConfig, datamodule: Any, pretrained: Pretrained | None = None
) -> Any:
    """The task's LightningModule around a fresh model sized to the tokenizer: the pre-trained weights in
    (``init_from``), then LoRA adapters (``model.lora``), before the optimizer is made."""
    from lmexp.data.tokenizer_store import checkpoint_entries

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
    model = model_config.build()
    task = task_class.build(
        settings.task,
        model,
        inputs,
        optimizer=settings.optim,
        scheduler=settings.scheduler,
        compile=settings.run.compile,
    )
    if pretrained is not None:  # the backbone (fine-tuning, fresh head) or the whole model (clm, mlm)
        task.load_pretrained(pretrained.state_dict)
    base = lora_base(settings, pretrained)
    if base is not None:
        task.apply_lora(model_config.lora)
    task.checkpoint_extras = {
        "config": redact(OmegaConf.to_container(cfg, resolve=True)),
        "model_kind": settings.model_spec.kind,
        "task": task_class.name,
        "model_config": model_config.to_dict(),
        **checkpoint_entries(tokenizer),
        **({"labels": list(labels)} if labels is not None else {}),
        **({"lora_base": base} if base is not None else {}),
        **({"hf_config": model.hf.config.to_dict()} if hasattr(model, "hf") else {}),
    }
    task.parameter_counts = parameter_counts(task)
    log.info(
        "model: %s parameters, %s trainable%s",
        f"{task.parameter_counts['model/params']:,}",
        f"{task.parameter_counts['model/trainable_params']:,}",
        f" (LoRA r={model_config.lora.r} on {model_config.lora.target})" if base is not None else "",
    )
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
