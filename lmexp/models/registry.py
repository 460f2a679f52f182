"""The model kinds lmexp trains, and the contract between a model and the tasks.

A model kind is one model file (a config dataclass and an ``nn.Module``), one ``conf/model/<kind>.yaml`` whose
``_target_`` names the config class, and one :class:`ModelSpec` in :data:`MODELS` below. Nothing else in
lmexp names a model kind: builders, tasks, generation, FSDP and export ask the spec or call the module's
backbone methods.

**The backbone contract.** Every model module offers:

- ``config``: its config dataclass (``hidden_width``, ``vocab_size``, ``max_seq_len``; ``num_parameters()``);
- ``token_states(input_ids, attention_mask) -> (B, T, C)``: the final hidden states that task heads read
  (padding on the right never changes a real position's state); a kind with segment embeddings (bert)
  also takes ``token_type_ids=`` (question answering gives the question/context segments when it can);
- ``pool(hidden, attention_mask) -> (B, C)``: one vector per sequence for sequence classification;
- ``drop_pretraining_heads(keep_pooler)``: remove what fine-tuning never calls;
- ``shard_units() -> list[nn.Module]``: the sub-modules FSDP shards one by one (the transformer blocks).

A kind whose config also has a ``layout`` (model=hf: it depends on the model it loads) frames labelled
examples by it rather than by its spec; a kind with ``own_tokenizer`` brings its tokenizer (the config's
``tokenizer_dir(cache_dir)``) instead of lmexp training a sentencepiece one.

Causal language models (``pretraining="clm"``) also offer ``forward(input_ids, labels=None)`` (logits, or with
labels the summed loss as a :class:`~lmexp.models.head_loss.HeadLoss`) and ``start_generation(prompt)``; those
that list ``sft`` among their tasks also take ``forward(..., document_ids=)`` (packed examples that never
attend to each other, lmexp/models/document_mask.py);
masked language models (``"mlm"``) offer ``forward(input_ids, token_type_ids, attention_mask, mlm_positions)``
-> ``(mlm_logits, nsp_logits)``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

from lmexp.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """What one model kind offers."""

    kind: str
    """Short name, as in ``conf/model/<kind>.yaml`` and in messages."""
    config_class: str
    """Import path of its config dataclass (the ``_target_`` of its YAML files)."""
    pretraining: Literal["clm", "mlm"]
    """The task it is pre-trained with."""
    fine_tuning: tuple[str, ...] = ("classify", "ner")
    """The fine-tuning tasks its hidden states can feed (a fresh head on ``token_states``/``pool``)."""
    layout: Literal["cls_sep", "eos"] = "eos"
    """How a labelled example is framed: ``[CLS] text [SEP]`` (encoders; the tokenizer needs both tokens) or
    ``[eos] text`` (decoders: a document starts after eos in pre-training)."""
    hf_adapter: str | None = None
    """Module holding its Hugging Face state-dict adapter (export to and import from transformers), or None
    when transformers has no equivalent class."""
    hf_model_type: str | None = None
    """The ``model_type`` of the Hugging Face configs this kind can import (``gpt2``, ``bert``, ``llama``)."""
    document_mask: bool = False
    """Its forward takes ``document_ids``: attention masked at document boundaries (data.document_mask)."""
    also_pretrains: tuple[str, ...] = ()
    """Further pre-training tasks (model=hf: ``mlm`` too, for the models whose head is a masked-LM one)."""
    own_tokenizer: bool = False
    """The model brings its own tokenizer (model=hf: its ``AutoTokenizer``); no sentencepiece is trained."""

    @property
    def tasks(self) -> tuple[str, ...]:
        """Every task this kind can run."""
        return (self.pretraining, *self.also_pretrains, *self.fine_tuning)

    def config_type(self) -> type:
        """The config dataclass (imported on first use: model files import torch)."""
        module, _, name = self.config_class.rpartition(".")
        return getattr(importlib.import_module(module), name)


MODELS: dict[str, ModelSpec] = {
    spec.kind: spec
    for spec in (
        ModelSpec(
            "gpt", "lmexp.models.gpt.GPTConfig", "clm", fine_tuning=("classify", "ner", "sft"),
            hf_adapter="lmexp.models.gpt_hf", hf_model_type="gpt2", document_mask=True,
        ),
        ModelSpec(
            "bert", "lmexp.models.bert.BERTConfig", "mlm", fine_tuning=("classify", "ner", "qa"),
            layout="cls_sep", hf_adapter="lmexp.models.bert_hf", hf_model_type="bert",
        ),
        ModelSpec(
            "llama", "lmexp.models.llama.LlamaConfig", "clm", fine_tuning=("classify", "ner", "sft"),
            hf_adapter="lmexp.models.llama_hf", hf_model_type="llama", document_mask=True,
        ),
        ModelSpec("lstm", "lmexp.models.lstm.LSTMConfig", "clm"),
        ModelSpec(  # qa for encoders, sft for decoders: HFModelConfig.task_problems checks the model
            "hf", "lmexp.models.hf.HFModelConfig", "clm", also_pretrains=("mlm",), own_tokenizer=True,
            fine_tuning=("classify", "ner", "qa", "sft"), document_mask=True,
        ),
    )
}  # fmt: skip


def context_length(model: Any) -> tuple[int | None, str]:
    """The longest sequence ``model`` (a built model) takes, and the setting that names it:
    ``max_seq_len`` of lmexp's kinds, ``max_position_embeddings`` of a model=hf model; None when unbounded."""
    limit = getattr(model.config, "max_seq_len", None)
    if limit is not None:
        return limit, "max_seq_len"
    return getattr(model, "max_positions", None), "max_position_embeddings"


def spec_for_target(target: str) -> ModelSpec:
    """The spec whose config class is ``target`` (a ``_target_`` string)."""
    for spec in MODELS.values():
        if spec.config_class == target:
            return spec
    known = ", ".join(f"{s.kind} ({s.config_class})" for s in MODELS.values())
    raise ConfigError(f"model._target_={target} is not a model kind lmexp knows (known: {known})")


def spec_for(config: Any) -> ModelSpec:
    """The spec of a config instance or class."""
    cls = config if isinstance(config, type) else type(config)
    return spec_for_target(f"{cls.__module__}.{cls.__qualname__}")
