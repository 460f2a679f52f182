"""lmexp's BERT <-> Hugging Face BERT (masked LM, classifiers, QA): config and weights, both ways.

The layouts match (lmexp/models/bert.py lists the names); lmexp fuses query/key/value into one ``qkv``
Linear, split into rows ``[0:C]``, ``[C:2C]``, ``[2C:3C]`` on the way out and concatenated on the way in.
A pre-trained lmexp BERT's state dict has the bare names (``tok_emb.weight``, ``mlm_head.*``, ...); a
fine-tuned one (lmexp/tasks/classify.py, ner.py) has ``backbone.*`` plus its ``classifier.*``
head, which becomes Hugging Face's ``classifier`` (classify, ner) or ``qa_outputs`` (qa).

Padded vocabulary rows are dropped on the way out; an imported model gets ``pad_vocab_to_multiple=1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lmexp.errors import CheckpointError, ConfigError
from lmexp.models.hf_common import (
    HFWeights,
    hf_class_name,
    label_kwargs,
    require_setting,
    special_token_kwargs,
)

HF_CLASSES = {
    "mlm": "BertForMaskedLM",
    "classify": "BertForSequenceClassification",
    "ner": "BertForTokenClassification",
    "qa": "BertForQuestionAnswering",
    "pretrain": "BertForPreTraining",
}
"""lmexp task -> transformers class. ``pretrain`` is no lmexp task: it exports the masked-LM model with its
pooler and next-sentence head too (what task=mlm with task.nsp=true trains), so nothing is lost."""
DEFAULT_TASK = "mlm"
"""The task of a pre-trained bert."""
_HEAD_NAMES = {"classify": "classifier", "ner": "classifier", "qa": "qa_outputs"}  # HF names of task heads
_POOLED_TASKS = ("classify", "pretrain")  # the HF classes that have a pooler

# lmexp block part -> Hugging Face layer part; each has a weight and a bias.
_BLOCK_NAMES = {
    "attn.proj": "attention.output.dense",
    "ln1": "attention.output.LayerNorm",
    "mlp.fc": "intermediate.dense",
    "mlp.proj": "output.dense",
    "ln2": "output.LayerNorm",
}
_MLM_HEAD_NAMES = {
    "mlm_head.dense": "cls.predictions.transform.dense",
    "mlm_head.ln": "cls.predictions.transform.LayerNorm",
}


def hf_config(
    config: Any, vocab_size: int, special_ids: Mapping[str, int | None], labels: list[str] | None = None
) -> Any:
    """The ``BertConfig`` of an lmexp :class:`~lmexp.models.bert.BERTConfig`'s architecture (with
    ``labels``: a classifier's)."""
    from transformers import BertConfig

    if config.norm_first:
        raise ConfigError(
            "model.norm_first=true (pre-LN) cannot be expressed as a Hugging Face BERT (post-LN); "
            "export needs a bert trained with model.norm_first=false (the default)"
        )
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=config.n_embd,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        intermediate_size=config.mlp_ratio * config.n_embd,
        hidden_act="gelu",  # exact erf GELU, as lmexp's BERT
        hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout,
        max_position_embeddings=config.max_seq_len,
        type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.layer_norm_eps,
        **special_token_kwargs(special_ids),
        **label_kwargs(labels),
    )


def to_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Any, vocab_size: int, task: str | None = None
) -> dict[str, torch.Tensor]:
    """The weights of ``HF_CLASSES[task]`` from an lmexp BERT's (or fine-tuned BERT's) ``state_dict``."""
    task = task or DEFAULT_TASK
    hf_class_name(HF_CLASSES, "bert", task)
    fine_tuned = any(key.startswith("backbone.") for key in state_dict)
    base = {k.removeprefix("backbone."): v for k, v in state_dict.items()} if fine_tuned else state_dict
    weights = _encoder_to_hf(base, config.n_layer, vocab_size, pooler=task in _POOLED_TASKS)
    if task in ("mlm", "pretrain"):
        for ours, theirs in _MLM_HEAD_NAMES.items():
            for part in ("weight", "bias"):
                weights[f"{theirs}.{part}"] = base[f"{ours}.{part}"]
        weights["cls.predictions.decoder.weight"] = base["mlm_head.decoder.weight"][:vocab_size]
        # Hugging Face keeps the decoder's bias twice (the same tensor under two names).
        weights["cls.predictions.bias"] = base["mlm_head.decoder.bias"][:vocab_size]
        weights["cls.predictions.decoder.bias"] = base["mlm_head.decoder.bias"][:vocab_size]
    if task == "pretrain":
        weights["cls.seq_relationship.weight"] = base["nsp_head.weight"]
        weights["cls.seq_relationship.bias"] = base["nsp_head.bias"]
    if task in _HEAD_NAMES:
        for part in ("weight", "bias"):
            weights[f"{_HEAD_NAMES[task]}.{part}"] = state_dict[f"classifier.{part}"]
    return weights


def _encoder_to_hf(base: Mapping[str, torch.Tensor], n_layer: int, vocab_size: int, pooler: bool) -> dict:
    """``bert.*`` weights (embeddings, encoder and, with ``pooler``, the pooler) from an lmexp BERT's."""
    weights = {
        "bert.embeddings.word_embeddings.weight": base["tok_emb.weight"][:vocab_size],
        "bert.embeddings.position_embeddings.weight": base["pos_emb.weight"],
        "bert.embeddings.token_type_embeddings.weight": base["type_emb.weight"],
        "bert.embeddings.LayerNorm.weight": base["emb_ln.weight"],
        "bert.embeddings.LayerNorm.bias": base["emb_ln.bias"],
    }
    for i in range(n_layer):
        prefix = f"bert.encoder.layer.{i}"
        for part in ("weight", "bias"):
            qkv = base[f"blocks.{i}.attn.qkv.{part}"]
            for name, chunk in zip(("query", "key", "value"), qkv.chunk(3, dim=0), strict=True):
                weights[f"{prefix}.attention.self.{name}.{part}"] = chunk
            for ours, theirs in _BLOCK_NAMES.items():
                weights[f"{prefix}.{theirs}.{part}"] = base[f"blocks.{i}.{ours}.{part}"]
    if pooler:
        weights["bert.pooler.dense.weight"] = base["pooler.dense.weight"]
        weights["bert.pooler.dense.bias"] = base["pooler.dense.bias"]
    return weights


def _check_architecture(hf_config: Any) -> None:
    """A CheckpointError naming the first BERT setting lmexp's BERT cannot reproduce."""

    def check(key: str, allowed: Any, expected: str) -> None:
        require_setting(hf_config, key, allowed, expected, "bert")

    check("model_type", lambda v: v == "bert", "bert")
    check(
        "position_embedding_type", lambda v: v in (None, "absolute"), "absolute (learned position embeddings)"
    )
    check("hidden_act", lambda v: v == "gelu", "gelu (the exact erf GELU)")
    check("is_decoder", lambda v: not v, "false (an encoder)")
    check("add_cross_attention", lambda v: not v, "false")
    width = hf_config.hidden_size
    check("intermediate_size", lambda v: v % width == 0, f"a multiple of hidden_size={width}")


def from_hf(
    hf_config: Any, hf_state_dict: Mapping[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(BERTConfig field values, state_dict)`` of a Hugging Face BERT with a task head.

    Understands ``BertForPreTraining``, ``BertForMaskedLM``, ``BertForSequenceClassification``,
    ``BertForTokenClassification`` and ``BertForQuestionAnswering`` (keys ``bert.*`` plus their heads).
    With a classifier or QA head the state dict is a fine-tuned model's (``backbone.*`` + ``classifier.*``);
    otherwise a pre-trained BERT's, without the pooler and next-sentence head when the Hugging Face model
    has none (``BertForMaskedLM``): load it with ``strict=False`` and keep those two fresh.
    Raises CheckpointError (one line, naming the setting or weight) for a BERT lmexp cannot hold.
    """
    _check_architecture(hf_config)
    hf = HFWeights(hf_state_dict, "bert")
    C, V = hf_config.hidden_size, hf_config.vocab_size
    head = next((name for name in ("classifier", "qa_outputs") if f"{name}.weight" in hf), None)
    base = _encoder_from_hf(hf, hf_config)
    if "cls.predictions.bias" in hf:
        if not hf_config.tie_word_embeddings:
            raise CheckpointError(
                "Hugging Face bert config tie_word_embeddings=False cannot be expressed as an lmexp bert: "
                "expected true (lmexp's masked-LM decoder is the word embedding)"
            )
        for ours, theirs in _MLM_HEAD_NAMES.items():
            shape = (C, C) if ours.endswith("dense") else (C,)
            base[f"{ours}.weight"] = hf.take(f"{theirs}.weight", shape)
            base[f"{ours}.bias"] = hf.take(f"{theirs}.bias", (C,))
        base["mlm_head.decoder.weight"] = base["tok_emb.weight"]
        base["mlm_head.decoder.bias"] = hf.take("cls.predictions.bias", (V,))
        for tied in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"):
            if tied in hf:
                hf.take(tied, (V, C) if tied.endswith("weight") else (V,))  # the same tensors again
    if "cls.seq_relationship.weight" in hf:
        base["nsp_head.weight"] = hf.take("cls.seq_relationship.weight", (2, C))
        base["nsp_head.bias"] = hf.take("cls.seq_relationship.bias", (2,))
    ours = base
    if head is not None:
        n_labels = hf_state_dict[f"{head}.weight"].shape[0]
        ours = {f"backbone.{key}": value for key, value in base.items()}
        ours["classifier.weight"] = hf.take(f"{head}.weight", (n_labels, C))
        ours["classifier.bias"] = hf.take(f"{head}.bias", (n_labels,))
    hf.check_all_used()
    fields = {
        "n_layer": hf_config.num_hidden_layers,
        "n_head": hf_config.num_attention_heads,
        "n_embd": C,
        "max_seq_len": hf_config.max_position_embeddings,
        "type_vocab_size": hf_config.type_vocab_size,
        "vocab_size": V,
        "pad_vocab_to_multiple": 1,
        "dropout": float(hf_config.hidden_dropout_prob),  # lmexp has one rate; BERT's two are usually equal
        "norm_first": False,
        "layer_norm_eps": float(hf_config.layer_norm_eps),
        "mlp_ratio": hf_config.intermediate_size // C,
    }
    return fields, {key: value.detach() for key, value in ours.items()}


def _encoder_from_hf(hf: HFWeights, hf_config: Any) -> dict[str, torch.Tensor]:
    """lmexp BERT names of the ``bert.*`` weights (embeddings, encoder, and the pooler if present)."""
    C, V, hidden = hf_config.hidden_size, hf_config.vocab_size, hf_config.intermediate_size
    if not any(key.startswith("bert.") for key in hf.state_dict):
        raise CheckpointError(
            "Hugging Face bert state dict has no bert.* weights; expected a BERT with a task head"
        )
    embeddings = "bert.embeddings"
    base = {
        "tok_emb.weight": hf.take(f"{embeddings}.word_embeddings.weight", (V, C)),
        "pos_emb.weight": hf.take(
            f"{embeddings}.position_embeddings.weight", (hf_config.max_position_embeddings, C)
        ),
        "type_emb.weight": hf.take(
            f"{embeddings}.token_type_embeddings.weight", (hf_config.type_vocab_size, C)
        ),
        "emb_ln.weight": hf.take(f"{embeddings}.LayerNorm.weight", (C,)),
        "emb_ln.bias": hf.take(f"{embeddings}.LayerNorm.bias", (C,)),
    }
    shapes = {
        "attn.proj": (C, C),
        "ln1": (C,),
        "mlp.fc": (hidden, C),
        "mlp.proj": (C, hidden),
        "ln2": (C,),
    }
    for i in range(hf_config.num_hidden_layers):
        prefix = f"bert.encoder.layer.{i}"
        for part in ("weight", "bias"):
            qkv_shape = (C, C) if part == "weight" else (C,)
            chunks = [
                hf.take(f"{prefix}.attention.self.{name}.{part}", qkv_shape)
                for name in ("query", "key", "value")
            ]
            base[f"blocks.{i}.attn.qkv.{part}"] = torch.cat(chunks, dim=0)  # (3C, C) or (3C,)
            for ours, theirs in _BLOCK_NAMES.items():
                shape = shapes[ours] if part == "weight" else shapes[ours][:1]
                base[f"blocks.{i}.{ours}.{part}"] = hf.take(f"{prefix}.{theirs}.{part}", shape)
    if "bert.pooler.dense.weight" in hf:
        base["pooler.dense.weight"] = hf.take("bert.pooler.dense.weight", (C, C))
        base["pooler.dense.bias"] = hf.take("bert.pooler.dense.bias", (C,))
    return base
