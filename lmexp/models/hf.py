"""Any Hugging Face transformers language model as an lmexp model kind: ``model=hf model.name_or_path=...``.

:class:`HFModelConfig` (conf/model/hf.yaml) names a local directory (what ``save_pretrained`` writes) or a hub
id; :class:`HFModel` wraps the transformers model and offers lmexp's backbone contract
(lmexp/models/registry.py), so tasks, FSDP, generation and the metrics treat it as one of lmexp's own:

- decoders (a config with an ``AutoModelForCausalLM`` class: GPT-2, Llama, Qwen2, Mistral, ...) train with
  ``task=clm``; the loss is lmexp's chunked head loss (lmexp/models/head_loss.py) on the base model's last
  hidden state and the model's output embedding, so the (B, T, V) logits never exist at once (a model whose
  logits are more than that Linear, e.g. soft-capped, is found out once at build and takes the plain loss);
- encoders (an ``AutoModelForMaskedLM`` class and no decoder flag: BERT, RoBERTa, ...) train with
  ``task=mlm``, masked LM only: transformers' masked-LM classes have no next-sentence head
  (``task.nsp=false``);
- both fine-tune with a fresh lmexp head (``task=classify``, ``task=ner``) on ``token_states`` / ``pool``;
  encoders also answer questions (``task=qa``: a span head on ``token_states``, with segment ids when the
  model has segment embeddings), decoders also learn prompt -> completion (``task=sft``: packed examples
  kept apart by a block-diagonal 4-D attention mask and positions restarting per example);
- the tokenizer is the model's own (``AutoTokenizer``: :class:`lmexp.data.text_tokenizer.HFTokenizer`).

Every problem found about the model is one line naming ``model.name_or_path``: no config.json, no weights,
no language-model head for the task, code that needs ``model.trust_remote_code``, weights that do not fit
the config, a hub id that cannot be found or fetched (``HF_HUB_OFFLINE=1`` is respected).

Shape legend: B batch, T sequence length, C hidden size, V the model's vocabulary (embedding rows), N masked
positions.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmexp.config.schema import listed
from lmexp.errors import ConfigError
from lmexp.models.config import ModelConfig
from lmexp.models.head_loss import linear_cross_entropy, logits_cross_entropy
from lmexp.models.layers import last_token
from lmexp.models.lora import LoRAOptions

Step = Callable[[torch.Tensor], torch.Tensor]  # new tokens (N, 1) -> their logits (N, V)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KEY = "model.name_or_path"


@dataclass
class HFModelConfig(ModelConfig):
    """``conf/model/hf.yaml``: a Hugging Face transformers model, by local directory or hub id.

    The architecture (and with ``pretrained`` the weights) come from the model's own files; the sizes lmexp
    reports (``n_layer``, ``n_embd``, ...) are read from its config. Nothing is read until the run needs
    the model (after the config checks), so a typo in a key is reported before any download.
    """

    name_or_path: str = ""
    """A local model directory (``save_pretrained``'s output: config.json, weights, tokenizer files) or a
    Hugging Face hub id (``gpt2``, ``Qwen/Qwen2.5-0.5B``)."""
    revision: str | None = None
    """Hub branch, tag or commit of a hub id; null = its main branch."""
    pretrained: bool = True
    """Load the model's weights (true), or build its architecture from its config with fresh weights."""
    config_overrides: dict[str, Any] | None = None
    """Settings that replace the model config's, e.g. ``{num_hidden_layers: 2}``; with ``pretrained`` only
    those that keep the weights' shapes."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the weights as loaded (float32 keeps fp32 master weights; trainer.precision picks mixed
    precision)."""
    trust_remote_code: bool = False
    """Run the Python code a model ships for an architecture transformers lacks (off: such a model is
    refused; turn on only for code you trust)."""
    attn_implementation: str | None = None
    """transformers' attention kernel (``sdpa``, ``eager``, ``flash_attention_2``); null = its default."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass (transformers' gradient checkpointing)."""
    vocab_size: int | None = None
    """The tokenizer's vocabulary size, filled in by the builder (the embedding size is the model's own)."""
    name: str = "hf"
    """Informational label for logs and run names."""
    lora: LoRAOptions = listed(LoRAOptions)
    """LoRA adapters (``model.lora.r=8 model.lora.target=[...]``, lmexp/models/lora.py); null ``r``: off."""

    # ------------------------------------------------------------------------ what the model's files say
    def hf_config(self) -> Any:
        """The transformers config (a fresh copy), ``config_overrides`` applied; one-line errors."""
        overrides = json.dumps(self.config_overrides or {}, sort_keys=True)
        return copy.deepcopy(
            _load_config(self.name_or_path, self.revision, self.trust_remote_code, overrides)
        )

    @property
    def objective(self) -> Literal["clm", "mlm"]:
        """``clm`` for a decoder (it has a causal-LM class), ``mlm`` for an encoder (a masked-LM class)."""
        return objective_of(self.hf_config(), self.name_or_path)

    @property
    def layout(self) -> Literal["cls_sep", "eos"]:
        """How a labelled example is framed for it: ``[CLS] text [SEP]`` (encoders) or ``[eos] text``."""
        return "cls_sep" if self.objective == "mlm" else "eos"

    @property
    def hidden_width(self) -> int:
        return int(self.hf_config().hidden_size)

    @property
    def n_embd(self) -> int:
        """The hidden size (FLOP counts and memory estimates read transformers' sizes by lmexp's names)."""
        return self.hidden_width

    @property
    def n_layer(self) -> int:
        """Number of transformer layers."""
        return int(self.hf_config().num_hidden_layers)

    @property
    def n_head(self) -> int:
        """Attention heads per layer."""
        return int(self.hf_config().num_attention_heads)

    def task_problems(self, task: str) -> list[str]:
        """Why the model cannot run ``task`` (pre-training needs its kind of head); reads the config."""
        objective = self.objective
        if task in ("clm", "mlm") and task != objective:
            has = "a causal-LM head (a decoder)" if objective == "clm" else "a masked-LM head (an encoder)"
            return [
                f"{KEY}={self.name_or_path} has {has}: task={task} needs a "
                f"{'causal' if task == 'clm' else 'masked'}-LM head; use task={objective}"
            ]
        needs = {
            "qa": ("mlm", "an encoder (a masked-LM model: BERT, RoBERTa, ...)"),
            "sft": ("clm", "a decoder (a causal-LM model: GPT-2, Llama, Qwen2, ...)"),
        }
        if task in needs and objective != needs[task][0]:
            kind = "a decoder" if objective == "clm" else "an encoder"
            return [f"{KEY}={self.name_or_path} is {kind}: task={task} needs {needs[task][1]}"]
        return []

    # ------------------------------------------------------------------------------------------ building
    def build(self) -> HFModel:
        """The wrapped transformers model: the weights when ``pretrained`` (not on the meta device, where
        only the architecture is built, for counting), else fresh ones from the config."""
        return HFModel(self, self.transformers_model(weights=self.pretrained))

    def tokenizer_dir(self, cache_dir: Path) -> Path:
        """The model's own tokenizer, saved into lmexp's cache (keyed by its files); its directory."""
        from lmexp.data.tokenizer_store import save_hf_tokenizer

        return save_hf_tokenizer(self.name_or_path, cache_dir, self.revision, self.trust_remote_code)

    def build_from_saved(self, saved_config: dict[str, Any]) -> HFModel:
        """The architecture of a checkpoint's saved transformers config, weights uninitialised for loading
        (restoring a run does not need the model's directory)."""
        from transformers import AutoConfig

        values = dict(saved_config)
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        return HFModel(self, self._auto_class(config).from_config(config, **self._load_options()))

    def num_parameters(self) -> int:
        """Number of distinct parameters, counted on a meta-device build (nothing is loaded)."""
        with torch.device("meta"):
            model = self.build()
        return sum(p.numel() for p in model.parameters())

    def _auto_class(self, config: Any, by_architecture: bool = False) -> Any:
        """``AutoModelForMaskedLM`` for an encoder, ``AutoModelForCausalLM`` for a decoder; with
        ``by_architecture`` the class config.json names, where transformers has it (a BertForPreTraining
        keeps its pooler and next-sentence head)."""
        import transformers

        objective = objective_of(config, self.name_or_path)
        if by_architecture and getattr(config, "architectures", None):
            named = getattr(transformers, config.architectures[0], None)
            if named is not None:
                return named
        return transformers.AutoModelForMaskedLM if objective == "mlm" else transformers.AutoModelForCausalLM

    def _load_options(self) -> dict[str, Any]:
        """``from_pretrained``/``from_config`` arguments from the settings."""
        options: dict[str, Any] = {"dtype": DTYPES[self.dtype], "trust_remote_code": self.trust_remote_code}
        if self.attn_implementation:
            options["attn_implementation"] = self.attn_implementation
        return options

    def transformers_model(self, weights: bool, by_architecture: bool = False) -> Any:
        """The transformers model itself: loaded (``weights``; not on the meta device) or built from the
        config. ``by_architecture``: the class config.json names (importing into lmexp's own kinds)."""
        config = self.hf_config()
        auto = self._auto_class(config, by_architecture)
        options = self._load_options()
        if not weights or torch.get_default_device().type == "meta":
            return _quietly(lambda: auto.from_config(config, **options))
        return _quietly(
            lambda: _loading(
                lambda: auto.from_pretrained(
                    self.name_or_path, config=config, revision=self.revision, **options
                ),
                self.name_or_path,
            )
        )


# ------------------------------------------------------------------------------------------- the model
class HFModel(nn.Module):
    """A transformers causal-LM or masked-LM model behind lmexp's backbone contract.

    Parameter names are ``hf.<transformers name>``, so a state dict is transformers' own under one prefix.

    Args:
        config: its :class:`HFModelConfig` (``vocab_size`` is the tokenizer's).
        model: the transformers model (``...ForCausalLM`` or ``...ForMaskedLM``).
    """

    def __init__(self, config: HFModelConfig, model: Any) -> None:
        super().__init__()
        self.config = config
        self.hf = model
        self.objective = objective_of(model.config, config.name_or_path)
        hf_config = model.config
        self.max_positions: int | None = getattr(hf_config, "max_position_embeddings", None) or getattr(
            hf_config, "n_positions", None
        )
        rows = model.get_input_embeddings().weight.shape[0]
        if config.vocab_size is not None and config.vocab_size > rows:
            raise ConfigError(
                f"{KEY}={config.name_or_path}: its tokenizer has {config.vocab_size} tokens but the model's "
                f"embeddings have {rows} rows; expected a tokenizer that fits the model"
            )
        if config.gradient_checkpointing:
            if not model.supports_gradient_checkpointing:
                raise ConfigError(
                    f"model.gradient_checkpointing=true: {type(model).__name__} does not support it; "
                    "use trainer=fsdp with trainer.strategy.activation_checkpointing=true, or turn it off"
                )
            # transformers 5's name (gradient_checkpointing_enable is deprecated)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self._head = self._find_head()
        model.train()  # from_pretrained hands it over in eval mode; Lightning switches modes from here on

    # ------------------------------------------------------------------------------------------ the head
    def _head_module(self) -> nn.Module | None:
        """The module that maps the base model's last hidden states to logits: the output embedding of a
        causal LM; the one child beside the base model of a masked LM (BERT's ``cls``, RoBERTa's
        ``lm_head``). None when there is no such single module."""
        if self.objective == "clm":
            return self.hf.get_output_embeddings()
        others = [child for child in self.hf.children() if child is not self.hf.base_model]
        return others[0] if len(others) == 1 else None

    @torch.no_grad()
    def _find_head(self) -> nn.Module | None:
        """The head module when logits are exactly ``head(last hidden state)``, checked once on a few
        tokens; None means the model's own forward computes the logits (the plain loss path)."""
        head = self._head_module()
        weight = next(self.hf.parameters())
        if head is None or weight.device.type == "meta":
            return head
        ids = torch.arange(1, 9, device=weight.device)[None] % self.hf.get_input_embeddings().weight.shape[0]
        was_training = self.hf.training
        self.hf.eval()
        try:
            logits = self.hf(input_ids=ids, use_cache=False).logits  # (1, 8, V)
            hidden = self._base(ids)  # (1, 8, C)
            same = torch.allclose(head(hidden).float(), logits.float(), atol=1e-4, rtol=1e-3)
        finally:
            self.hf.train(was_training)
        return head if same else None

    # ------------------------------------------------------------------------------------------ forward
    def _base(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Last hidden states (B, T, C) of the base model (no head)."""
        self._check_length(input_ids.shape[1])
        out = self.hf.base_model(input_ids=input_ids, use_cache=False, return_dict=True, **kwargs)
        return out.last_hidden_state

    def _check_length(self, length: int) -> None:
        if self.max_positions is not None and length > self.max_positions:
            raise ConfigError(
                f"sequence length {length} exceeds the {self.max_positions} positions of "
                f"{KEY}={self.config.name_or_path}: expected data.block_size (or the generation context) "
                f"<= {self.max_positions}"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mlm_positions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> Any:
        """As lmexp's models: a causal LM gives logits (B, T, V), or with ``labels`` (B, T) the summed
        next-token loss as a :class:`HeadLoss`; a masked LM gives ``(mlm_logits, None)`` (no next-sentence
        head), the logits (B, T, V), or (N, V) at ``mlm_positions`` (N,) of the flattened batch.
        ``document_ids`` (B, T) of packed blocks (a causal LM): each token attends to its own document only,
        and positions restart at each document (:func:`packed_inputs`)."""
        if self.objective == "mlm":
            return self._masked_lm(input_ids, token_type_ids, attention_mask, mlm_positions), None
        # attention_mask (B, 1, T, T) and position_ids (B, T) of packed documents; {} for plain blocks
        packed = {} if document_ids is None else packed_inputs(document_ids, self.hf.dtype)
        if labels is None:
            self._check_length(input_ids.shape[1])
            masks = packed or {"attention_mask": attention_mask}
            return self.hf(input_ids=input_ids, use_cache=False, **masks).logits
        flat_labels = labels.flatten()  # (B*T,)
        if self._head is None:  # logits are more than a Linear of the hidden states: the plain loss on them
            self._check_length(input_ids.shape[1])
            logits = self.hf(input_ids=input_ids, use_cache=False, **packed).logits  # (B, T, V)
            return logits_cross_entropy(logits.flatten(0, 1), flat_labels, self.config.vocab_size)
        hidden = self._base(input_ids, **packed)  # (B, T, C)
        return linear_cross_entropy(
            hidden.flatten(0, 1), self._head.weight, self._head.bias, flat_labels, self.config.vocab_size
        )

    def _masked_lm(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        positions: torch.Tensor | None,
    ) -> torch.Tensor:
        """Masked-LM logits (B, T, V), or (N, V) at ``positions`` (the head then runs on those rows only)."""
        kwargs: dict[str, Any] = {"attention_mask": attention_mask}
        if token_type_ids is not None and getattr(self.hf.config, "type_vocab_size", 0) >= 2:
            kwargs["token_type_ids"] = token_type_ids  # RoBERTa-style models have a single segment
        if positions is not None and self._head is not None:
            hidden = self._base(input_ids, **kwargs).flatten(0, 1)[positions]  # (N, C)
            return self._head(hidden)  # (N, V)
        self._check_length(input_ids.shape[1])
        logits = self.hf(input_ids=input_ids, return_dict=True, **kwargs).logits  # (B, T, V)
        return logits if positions is None else logits.flatten(0, 1)[positions]

    # ------------------------------------------------------------- the backbone contract (models/registry.py)
    def token_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The base model's last hidden states (B, T, C); padding is masked out of attention. Segment ids
        (question answering's question/context) reach only a model with segment embeddings."""
        kwargs: dict[str, Any] = {"attention_mask": attention_mask}
        if token_type_ids is not None and getattr(self.hf.config, "type_vocab_size", 0) >= 2:
            kwargs["token_type_ids"] = token_type_ids  # RoBERTa-style models have a single segment
        return self._base(input_ids, **kwargs)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence vectors (B, C): a decoder's last real token (it has seen the whole text), an encoder's
        first token (``[CLS]``; the model's pooler, if any, is not used)."""
        if self.objective == "mlm":
            return hidden[:, 0]
        return last_token(hidden, attention_mask)

    def drop_pretraining_heads(self, keep_pooler: bool) -> None:
        """Remove the language-model head (a tied one's matrix stays as the input embedding)."""
        for name, child in list(self.hf.named_children()):
            if child is not self.hf.base_model:
                setattr(self.hf, name, None)
        self._head = None

    def shard_units(self) -> list[nn.Module]:
        """The transformer layers, found through the model: the items of its ``nn.ModuleList`` of same-class
        modules holding the most parameters (e.g. ``model.layers``, ``transformer.h``, ``encoder.layer``),
        preferring the classes the model names in ``_no_split_modules``."""
        no_split = set(getattr(self.hf, "_no_split_modules", None) or ())
        stacks = [
            m
            for m in self.hf.modules()
            if isinstance(m, nn.ModuleList) and len(m) and len({type(item) for item in m}) == 1
        ]
        if not stacks:
            return []
        named = [m for m in stacks if type(m[0]).__name__ in no_split]
        layers = max(named or stacks, key=lambda m: sum(p.numel() for p in m.parameters()))
        return list(layers)

    def start_generation(self, prompt: torch.Tensor) -> tuple[torch.Tensor, Step]:
        """Logits (N, V) after ``prompt`` (N, P), and a step that feeds new tokens (N, 1) through the model's
        own key/value cache (transformers' ``cache``) and returns their logits."""
        self._check_length(prompt.shape[1])
        out = self.hf(input_ids=prompt, use_cache=True)
        state = {"cache": out.cache, "length": prompt.shape[1]}

        def step(new: torch.Tensor) -> torch.Tensor:
            state["length"] += new.shape[1]
            self._check_length(state["length"])
            out = self.hf(input_ids=new, cache=state["cache"], use_cache=True)  # transformers 5's name
            state["cache"] = out.cache
            return out.logits[:, -1]  # (N, V)

        return out.logits[:, -1], step

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of distinct parameters (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def packed_inputs(document_ids: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``attention_mask`` (B, 1, T, T) and ``position_ids`` (B, T) that keep the documents of packed blocks
    apart in a transformers decoder: the block-diagonal causal mask as an additive float mask (0 = attend,
    the dtype's minimum = not; transformers passes a 4-D mask to its eager and sdpa attention as it is) and
    positions restarting at each document (lmexp/models/document_mask.py)."""
    from lmexp.models.document_mask import block_causal_mask, document_positions

    allowed = block_causal_mask(document_ids)  # (B, 1, T, T), True = may attend
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=document_ids.device)
    blocked = blocked.masked_fill(~allowed, torch.finfo(dtype).min)  # (B, 1, T, T)
    return {"attention_mask": blocked, "position_ids": document_positions(document_ids)}


# ------------------------------------------------------------------------------------- model's files
def objective_of(config: Any, name_or_path: str) -> Literal["clm", "mlm"]:
    """``mlm`` for an encoder (a masked-LM class, no decoder flag), ``clm`` for a decoder; a one-line
    ConfigError for a model with neither head, or an encoder-decoder."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    remote = getattr(config, "auto_map", None) or {}
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(
            f"{KEY}={name_or_path} is an encoder-decoder ({model_type}); model=hf trains decoders "
            "(AutoModelForCausalLM) and encoders (AutoModelForMaskedLM)"
        )
    masked = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES or "AutoModelForMaskedLM" in remote
    causal = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or "AutoModelForCausalLM" in remote
    if masked and not getattr(config, "is_decoder", False):
        return "mlm"
    if causal:
        return "clm"
    raise ConfigError(
        f"{KEY}={name_or_path} is a {model_type} ({type(config).__name__}), which has no causal-LM or "
        "masked-LM head in transformers (AutoModelForCausalLM, AutoModelForMaskedLM): model=hf trains those"
    )


def fingerprint(name_or_path: str, revision: str | None = None) -> str:
    """Identifies a model's weights without reading them (recorded as a LoRA run's base): its config.json
    and the names and sizes of its weight files; for a hub model, also the commit they came from."""
    import hashlib

    path = Path(name_or_path).expanduser()
    digest = hashlib.sha256(json.dumps(config_json(name_or_path, revision), sort_keys=True).encode())
    if path.is_dir():
        for file in sorted(path.iterdir()):
            if file.suffix in (".safetensors", ".bin", ".pt", ".pth") or file.name.endswith(".index.json"):
                digest.update(f"{file.name}:{file.stat().st_size}".encode())
    else:
        digest.update(f"{name_or_path}@{revision or 'main'}".encode())
    return digest.hexdigest()[:16]


def config_json(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """The model's config.json as a mapping (downloaded for a hub id); one-line ConfigErrors."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(
                f"{KEY}={name_or_path} is a file; expected a model directory (save_pretrained's output) "
                "or a Hugging Face hub id"
            )
        file = path / "config.json"
        if not file.is_file():
            raise ConfigError(
                f"{KEY}={name_or_path} has no config.json; expected a model directory written by "
                "save_pretrained (config.json, weights, tokenizer files)"
            )
    else:
        file = Path(_download(name_or_path, "config.json", revision))
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{KEY}={name_or_path}: config.json is not readable JSON ({error})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{KEY}={name_or_path}: config.json is not a JSON object")
    return values


def _download(repo_id: str, filename: str, revision: str | None) -> str:
    """A hub file's local path (from the hub cache when present); one line when it cannot be had."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except Exception as error:  # noqa: BLE001 - offline, unknown repo, gated, network: all the user's to fix
        offline = " (HF_HUB_OFFLINE=1: only models already in the hub cache load)" if _offline() else ""
        reason = " ".join(str(error).split())[:160]
        raise ConfigError(
            f"{KEY}={repo_id}: no such local directory, and the Hugging Face hub could not find or fetch "
            f"it{offline}: {type(error).__name__}: {reason}"
        ) from None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=16)
def _load_config(name_or_path: str, revision: str | None, trust_remote_code: bool, overrides: str) -> Any:
    """The transformers config of a model, overrides (JSON) applied and checked; cached per arguments."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    values = config_json(name_or_path, revision)
    model_type = values.get("model_type")
    if "auto_map" in values and model_type not in CONFIG_MAPPING_NAMES and not trust_remote_code:
        raise ConfigError(
            f"{KEY}={name_or_path} needs its own Python code ({model_type!r} is not an architecture "
            "transformers has; config.json's auto_map names the code): set model.trust_remote_code=true to "
            "run it, only for code you trust"
        )
    if model_type is None:
        raise ConfigError(
            f"{KEY}={name_or_path}: config.json has no model_type; expected a transformers config"
        )
    try:
        config = _quietly(
            lambda: AutoConfig.from_pretrained(
                name_or_path, revision=revision, trust_remote_code=trust_remote_code
            )
        )
    except (OSError, ValueError, KeyError) as error:
        reason = " ".join(str(error).split())[:200]
        raise ConfigError(f"{KEY}={name_or_path}: transformers cannot read its config ({reason})") from None
    unknown = sorted(key for key in json.loads(overrides) if not hasattr(config, key))
    if unknown:
        raise ConfigError(
            f"model.config_overrides.{unknown[0]} is not a setting of {type(config).__name__} "
            f"(its config.json has: {', '.join(sorted(config.to_diff_dict()))})"
        )
    for key, value in json.loads(overrides).items():
        setattr(config, key, value)
    return config


def _loading(load: Callable[[], Any], name_or_path: str) -> Any:
    """``load()`` (a ``from_pretrained``) with its failures as one-line ConfigErrors naming the model."""
    try:
        return load()
    except OSError as error:
        reason = " ".join(str(error).split())[:200]
        raise ConfigError(f"{KEY}={name_or_path}: its weights cannot be loaded ({reason})") from None
    except (RuntimeError, ValueError) as error:
        if "mismatch" not in str(error):
            raise
        raise ConfigError(
            f"{KEY}={name_or_path}: its weights do not have the shapes its config (with "
            "model.config_overrides) implies; expected the config.json the weights were saved with, or "
            "model.pretrained=false"
        ) from None


def _quietly(action: Callable[[], Any]) -> Any:
    """``action()`` with transformers' progress bars and loading reports off (errors still raise)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return action()
    finally:
        hf_logging.set_verbosity(verbosity)
