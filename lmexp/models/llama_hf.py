"""lmexp's Llama <-> Hugging Face ``LlamaForCausalLM``: config and weights, both ways.

The layouts match name for name (lmexp/models/llama.py lists them) and both rotate the two halves of each
head in RoPE, so the weights only change names; padded vocabulary rows are dropped on the way out, and an
imported model gets ``pad_vocab_to_multiple=1`` so its logits and loss equal the Hugging Face model's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lmexp.models.hf_common import HFWeights, hf_class_name, require_setting, special_token_kwargs

HF_CLASSES = {"clm": "LlamaForCausalLM"}
"""lmexp task -> transformers class."""
DEFAULT_TASK = "clm"
"""The task of a pre-trained llama."""

# lmexp block part -> Hugging Face layer part (weights only: neither model has biases).
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}


def hf_config(
    config: Any, vocab_size: int, special_ids: Mapping[str, int | None], labels: list[str] | None = None
) -> Any:
    """The ``LlamaConfig`` (transformers) of an lmexp :class:`~lmexp.models.llama.LlamaConfig`'s architecture.

    ``labels`` is accepted for the common API; a llama exports only as a language model.
    """
    from transformers import LlamaConfig as HFLlamaConfig

    return HFLlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.mlp_hidden_size,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_size,
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=config.dropout,
        tie_word_embeddings=config.tie_embeddings,
        **special_token_kwargs(special_ids),
    )


def to_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Any, vocab_size: int, task: str | None = None
) -> dict[str, torch.Tensor]:
    """``LlamaForCausalLM`` weights from an lmexp Llama's ``state_dict`` (tensors may be views of it)."""
    hf_class_name(HF_CLASSES, "llama", task or DEFAULT_TASK)
    weights = {
        "model.embed_tokens.weight": state_dict["tok_emb.weight"][:vocab_size],
        "model.norm.weight": state_dict["norm.weight"],
        "lm_head.weight": state_dict["lm_head.weight"][:vocab_size],  # the embedding again when tied
    }
    for i in range(config.n_layer):
        for ours, theirs in _BLOCK_NAMES.items():
            weights[f"model.layers.{i}.{theirs}.weight"] = state_dict[f"blocks.{i}.{ours}.weight"]
    return weights


def _check_architecture(hf_config: Any) -> None:
    """A CheckpointError naming the first Llama setting lmexp's Llama cannot reproduce."""

    def check(key: str, allowed: Any, expected: str) -> None:
        require_setting(hf_config, key, allowed, expected, "llama")

    check("model_type", lambda v: v == "llama", "llama")
    C, H = hf_config.hidden_size, hf_config.num_attention_heads
    check("attention_bias", lambda v: not v, "false (lmexp's Llama has no biases)")
    check("mlp_bias", lambda v: not v, "false (lmexp's Llama has no biases)")
    check("hidden_act", lambda v: v == "silu", "silu (SwiGLU)")
    check("head_dim", lambda v: v in (None, C // H), f"hidden_size / num_attention_heads = {C // H}")
    # transformers keeps a legacy rope_scaling (linear, dynamic, llama3, yarn, ...) in rope_parameters.
    check(
        "rope_parameters",
        lambda v: (
            (v or {}).get("rope_type", "default") == "default"
            and (v or {}).get("partial_rotary_factor", 1) == 1
        ),
        "plain RoPE (rope_type=default: no rope_scaling, no partial rotary factor)",
    )


def from_hf(
    hf_config: Any, hf_state_dict: Mapping[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(LlamaConfig field values, Llama state_dict)`` of a Hugging Face ``LlamaForCausalLM``.

    Raises CheckpointError (one line, naming the setting or weight) for a Llama lmexp cannot hold.
    """
    _check_architecture(hf_config)
    C, V, L = hf_config.hidden_size, hf_config.vocab_size, hf_config.num_hidden_layers
    H = hf_config.num_attention_heads
    K = hf_config.num_key_value_heads or H
    D, hidden = C // H, hf_config.intermediate_size
    hf = HFWeights(hf_state_dict, "llama")
    embedding = hf.take("model.embed_tokens.weight", (V, C))
    tied = bool(hf_config.tie_word_embeddings)
    lm_head = embedding
    if not tied or "lm_head.weight" in hf:
        head = hf.take("lm_head.weight", (V, C))  # an untied model must have it
        lm_head = embedding if tied else head
    ours = {
        "tok_emb.weight": embedding,
        "norm.weight": hf.take("model.norm.weight", (C,)),
        "lm_head.weight": lm_head,
    }
    shapes = {
        "attn_norm": (C,),
        "attn.q_proj": (H * D, C),
        "attn.k_proj": (K * D, C),
        "attn.v_proj": (K * D, C),
        "attn.o_proj": (C, H * D),
        "mlp_norm": (C,),
        "mlp.gate_proj": (hidden, C),
        "mlp.up_proj": (hidden, C),
        "mlp.down_proj": (C, hidden),
    }
    for i in range(L):
        for part, theirs in _BLOCK_NAMES.items():
            ours[f"blocks.{i}.{part}.weight"] = hf.take(f"model.layers.{i}.{theirs}.weight", shapes[part])
    hf.check_all_used()
    rope = hf_config.rope_parameters or {}
    fields = {
        "n_layer": L,
        "n_head": H,
        "n_kv_head": K,
        "n_embd": C,
        "intermediate_size": hidden,
        "max_seq_len": hf_config.max_position_embeddings,
        "vocab_size": V,
        "pad_vocab_to_multiple": 1,
        "rope_theta": float(rope.get("rope_theta", 10000.0)),
        "norm_eps": float(hf_config.rms_norm_eps),
        "tie_embeddings": tied,
        "dropout": float(hf_config.attention_dropout or 0.0),
    }
    return fields, {key: value.detach() for key, value in ours.items()}
