"""A checkpoint turned back into its run: config, tokenizer, model kind, and the task with its weights.

eval, generate and export all start here. The checkpoint names its model kind and task (written by
lmexp.training.build); checkpoints of earlier lmexp versions name them by class paths, which
:data:`LEGACY_TARGETS` maps to today's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Class paths of earlier lmexp versions' config nodes -> today's config classes.
LEGACY_TARGETS = {
    "lmexp.tasks.language_model.CausalLMTask": "lmexp.tasks.clm.CLMConfig",
    "lmexp.tasks.masked_lm.MaskedLMTask": "lmexp.tasks.mlm.MLMConfig",
    "lmexp.tasks.classify.SequenceClassificationTask": "lmexp.tasks.classify.ClassifyConfig",
    "lmexp.tasks.token_classify.TokenClassificationTask": "lmexp.tasks.ner.NERConfig",
    "lmexp.data.datamodule.LanguageModelData": "lmexp.data.datamodule.TextDataConfig",
    "lmexp.data.labelled.LabelledData": "lmexp.data.labelled.LabelledDataConfig",
}


@dataclass
class RestoredRun:
    """A checkpoint turned back into its run: config, tokenizer, task (weights loaded, eval mode)."""

    path: Path
    config: DictConfig
    tokenizer: Any
    task: Any
    labels: list[str] | None
    model_spec: Any
    """The model kind's registry entry (lmexp/models/registry.py)."""

    @property
    def task_name(self) -> str:
        return self.task.name

    @property
    def backbone(self) -> Any:
        """The model without a fine-tuning head."""
        return getattr(self.task.model, "backbone", self.task.model)

    @property
    def layout(self) -> str:
        """How the model frames labelled examples: its config's where that depends on the model (model=hf),
        else its kind's."""
        return getattr(self.backbone.config, "layout", None) or self.model_spec.layout

    def group(self, key: str, **overrides: Any) -> Any:
        """The typed config of one of the checkpoint's groups, ``overrides`` (non-null) on top."""
        from lmexp.config.schema import parse
        from lmexp.config.settings import target_class

        node = current(OmegaConf.to_container(self.config[key], resolve=True))
        node.update({k: v for k, v in overrides.items() if v is not None})
        return parse(target_class(node, key), node, key)


def current(node: dict[str, Any]) -> dict[str, Any]:
    """A saved config node with an earlier version's ``_target_`` replaced by today's."""
    target = node.get("_target_")
    return {**node, "_target_": LEGACY_TARGETS.get(target, target)} if target else dict(node)


def restore_run(path: str | Path, cache_dir: str | Path, key: str = "ckpt_path") -> RestoredRun:
    """Rebuild the task of the checkpoint at ``path`` (its model, tokenizer and labels) for inference.

    ``path`` is a checkpoint, or a run dir (its ``checkpoints/last.ckpt``). A LoRA checkpoint holds only
    what trained: its base (the recorded ``init_from`` model, or model=hf's ``name_or_path``) is loaded and
    checked first, then the adapters go on it, as in training.
    """
    from lmexp.config.schema import parse
    from lmexp.data.tokenizer_store import restore_tokenizer
    from lmexp.models.registry import MODELS, spec_for_target
    from lmexp.tasks.base import TaskInputs
    from lmexp.training.checkpoints import checkpoint_of, load_checkpoint

    path = checkpoint_of(path)
    checkpoint = load_checkpoint(path, key=key)
    run = checkpoint["lmexp"]
    config = OmegaConf.create(run["config"])
    tokenizer = restore_tokenizer(run, Path(cache_dir), key)
    spec = MODELS[run["model_kind"]] if "model_kind" in run else spec_for_target(str(config.model._target_))
    model_config = parse(spec.config_type(), run["model_config"], "model")
    restored = RestoredRun(path, config, tokenizer, None, run.get("labels"), spec)
    task_config = restored.group("task")
    inputs = TaskInputs(tokenizer, labels=run.get("labels"), seed=int(config.get("seed", 0)))
    base = run.get("lora_base")
    if "hf_config" in run and base is None:  # the whole model is in the checkpoint: no need of its directory
        model = model_config.build_from_saved(run["hf_config"])
    else:
        model = model_config.build()  # with LoRA on model=hf: the base weights, from name_or_path
    task = task_config.task_type().build(task_config, model, inputs)
    if base is not None:
        _load_lora_base(task, base, model_config, Path(cache_dir), f"{key}={path}")
        task.check_trained_weights(checkpoint["state_dict"], key)
    task.load_state_dict(checkpoint["state_dict"], strict=base is None)
    task.eval()
    restored.task = task
    return restored


def _load_lora_base(task: Any, base: dict[str, Any], model_config: Any, cache_dir: Path, where: str) -> None:
    """Put a LoRA checkpoint's base weights into ``task`` (unchanged since training: checked by
    fingerprint), then its adapters' places (the checkpoint's weights go into them next)."""
    from lmexp.errors import CheckpointError
    from lmexp.models.hf import fingerprint
    from lmexp.training.build import load_init_from

    if "init_from" in base:
        pretrained = load_init_from(base["init_from"], cache_dir)
        found, name = pretrained.fingerprint, f"init_from={base['init_from']}"
        task.load_pretrained(pretrained.state_dict)
    else:  # model=hf: build() loaded name_or_path's weights
        found, name = fingerprint(base["hf"], base.get("revision")), f"model.name_or_path={base['hf']}"
    if found != base["fingerprint"]:
        raise CheckpointError(
            f"{where} holds LoRA adapters for {name}, which has changed since they were trained "
            f"(fingerprint {found}, expected {base['fingerprint']}); expected the same base model"
        )
    task.apply_lora(model_config.lora)


def require(cfg: DictConfig, **expected: str) -> None:
    """A ConfigError naming every required key (``???`` in the config) the command line left unset."""
    from lmexp.errors import ConfigError

    missing = [
        f"{key} is not set: expected {what}"
        for key, what in expected.items()
        if OmegaConf.is_missing(cfg, key)
    ]
    if missing:
        raise ConfigError(missing)
