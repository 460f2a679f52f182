"""lmexp's GPT <-> Hugging Face ``GPT2LMHeadModel``: config and weights, both ways.

The layouts match one to one (lmexp/models/gpt.py lists the names). GPT-2 keeps its Linear layers as
``Conv1D`` with (in, out) weights, so attention and MLP matrices are transposed both ways; padded vocabulary
rows are dropped on the way out, and an imported model gets ``pad_vocab_to_multiple=1`` so its logits and
loss equal the Hugging Face model's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lmexp.errors import ConfigError
from lmexp.models.hf_common import HFWeights, hf_class_name, require_setting, special_token_kwargs

HF_CLASSES = {"clm": "GPT2LMHeadModel"}
"""lmexp task -> transformers class."""
DEFAULT_TASK = "clm"
"""The task of a pre-trained gpt."""
MLP_RATIO = 4  # lmexp's GPT MLP is 4 * n_embd wide

# lmexp block part -> GPT-2 block part; each has a weight and a bias. The Linear ones are Conv1D in GPT-2.
_BLOCK_NAMES = {
    "ln1": "ln_1",
    "attn.qkv": "attn.c_attn",
    "attn.proj": "attn.c_proj",
    "ln2": "ln_2",
    "mlp.fc": "mlp.c_fc",
    "mlp.proj": "mlp.c_proj",
}


def hf_config(
    config: Any, vocab_size: int, special_ids: Mapping[str, int | None], labels: list[str] | None = None
) -> Any:
    """The ``GPT2Config`` of an lmexp :class:`~lmexp.models.gpt.GPTConfig`'s architecture.

    ``labels`` is accepted for the common API; a gpt exports only as a language model.
    """
    from transformers import GPT2Config

    if not config.bias:
        raise ConfigError(
            "model.bias=false cannot be expressed as GPT2LMHeadModel (GPT-2 always has biases); "
            "export needs a gpt trained with model.bias=true (the default)"
        )
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=config.max_seq_len,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=MLP_RATIO * config.n_embd,
        activation_function="gelu_new",  # the tanh GELU lmexp's GPT uses
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=config.layer_norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        **special_token_kwargs(special_ids),
    )


def to_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Any, vocab_size: int, task: str | None = None
) -> dict[str, torch.Tensor]:
    """``GPT2LMHeadModel`` weights from an lmexp GPT's ``state_dict`` (tensors may be views of it)."""
    hf_class_name(HF_CLASSES, "gpt", task or DEFAULT_TASK)
    weights = {
        "transformer.wte.weight": state_dict["tok_emb.weight"][:vocab_size],
        "transformer.wpe.weight": state_dict["pos_emb.weight"],
        "transformer.ln_f.weight": state_dict["ln_f.weight"],
        "transformer.ln_f.bias": state_dict["ln_f.bias"],
        "lm_head.weight": state_dict["lm_head.weight"][:vocab_size],  # the embedding again when tied
    }
    for i in range(config.n_layer):
        for ours, theirs in _BLOCK_NAMES.items():
            weight = state_dict[f"blocks.{i}.{ours}.weight"]
            is_conv1d = not ours.startswith("ln")  # Conv1D stores (in, out)
            weights[f"transformer.h.{i}.{theirs}.weight"] = weight.t() if is_conv1d else weight
            weights[f"transformer.h.{i}.{theirs}.bias"] = state_dict[f"blocks.{i}.{ours}.bias"]
    return weights


def _check_architecture(hf_config: Any) -> None:
    """A CheckpointError naming the first GPT-2 setting lmexp's GPT cannot reproduce."""

    def check(key: str, allowed: Any, expected: str) -> None:
        require_setting(hf_config, key, allowed, expected, "gpt")

    check("model_type", lambda v: v == "gpt2", "gpt2")
    n_embd = hf_config.n_embd
    check(
        "scale_attn_by_inverse_layer_idx",
        lambda v: not v,
        "false (lmexp scales scores by 1/sqrt(head size) only)",
    )
    check("scale_attn_weights", lambda v: v, "true")
    check("add_cross_attention", lambda v: not v, "false (a decoder without cross-attention)")
    check("activation_function", lambda v: v in ("gelu_new", "gelu_pytorch_tanh"), "gelu_new (the tanh GELU)")
    check("n_inner", lambda v: v in (None, MLP_RATIO * n_embd), f"null or {MLP_RATIO * n_embd} (4 * n_embd)")


def from_hf(
    hf_config: Any, hf_state_dict: Mapping[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(GPTConfig field values, GPT state_dict)`` of a Hugging Face ``GPT2LMHeadModel`` (or ``GPT2Model``).

    Raises CheckpointError (one line, naming the setting or weight) for a GPT-2 lmexp cannot hold.
    """
    _check_architecture(hf_config)
    C, V, L = hf_config.n_embd, hf_config.vocab_size, hf_config.n_layer
    prefix = "transformer." if any(key.startswith("transformer.") for key in hf_state_dict) else ""
    hf = HFWeights(hf_state_dict, "gpt")
    embedding = hf.take(f"{prefix}wte.weight", (V, C))
    tied = bool(hf_config.tie_word_embeddings)
    # A tied model's head is its embedding (its state dict may list it under both names, or only once).
    lm_head = embedding
    if not tied or "lm_head.weight" in hf:
        head = hf.take("lm_head.weight", (V, C))  # an untied model must have it
        lm_head = embedding if tied else head
    ours = {
        "tok_emb.weight": embedding,
        "pos_emb.weight": hf.take(f"{prefix}wpe.weight", (hf_config.n_positions, C)),
        "ln_f.weight": hf.take(f"{prefix}ln_f.weight", (C,)),
        "ln_f.bias": hf.take(f"{prefix}ln_f.bias", (C,)),
        "lm_head.weight": lm_head,
    }
    # Conv1D weight shapes (in, out); LayerNorms are (C,).
    conv1d = {
        "attn.qkv": (C, 3 * C),
        "attn.proj": (C, C),
        "mlp.fc": (C, MLP_RATIO * C),
        "mlp.proj": (MLP_RATIO * C, C),
    }
    for i in range(L):
        for part, theirs in _BLOCK_NAMES.items():
            name, our_name = f"{prefix}h.{i}.{theirs}", f"blocks.{i}.{part}"
            if part in conv1d:
                ours[f"{our_name}.weight"] = hf.take(f"{name}.weight", conv1d[part]).t()  # (out, in)
                ours[f"{our_name}.bias"] = hf.take(f"{name}.bias", conv1d[part][1:])
            else:
                ours[f"{our_name}.weight"] = hf.take(f"{name}.weight", (C,))
                ours[f"{our_name}.bias"] = hf.take(f"{name}.bias", (C,))
    hf.check_all_used()
    fields = {
        "n_layer": L,
        "n_head": hf_config.n_head,
        "n_embd": C,
        "max_seq_len": hf_config.n_positions,
        "vocab_size": V,
        "pad_vocab_to_multiple": 1,
        "dropout": float(
            hf_config.resid_pdrop
        ),  # lmexp has one dropout rate; GPT-2's three are usually equal
        "bias": True,
        "tie_embeddings": tied,
        "layer_norm_eps": float(hf_config.layer_norm_epsilon),
    }
    return fields, {key: value.detach() for key, value in ours.items()}
