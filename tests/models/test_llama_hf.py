"""lmexp's Llama <-> Hugging Face LlamaForCausalLM: logits (fp32, 1e-4) both ways, round trip, mismatches."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmexp.errors import CheckpointError
from lmexp.models import llama_hf
from lmexp.models.hf_common import from_hf_model, to_hf_model
from lmexp.models.llama import LlamaConfig

VOCAB = 37
TOLERANCE = 1e-4
SPECIAL_IDS = {"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 0}


def tiny(**overrides) -> LlamaConfig:
    kwargs = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=24, vocab_size=VOCAB)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def hf_llama(**overrides) -> transformers.LlamaForCausalLM:
    """A tiny randomly initialised Hugging Face Llama, built offline from a config."""
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=24,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()


def ids(batch: int = 2, length: int = 17) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_embeddings": False}, {"n_kv_head": 1}, {"n_kv_head": None, "rope_theta": 500.0}],
    ids=["gqa-tied", "gqa-untied", "mqa", "mha"],
)
def test_lmexp_to_hf_logits(overrides: dict) -> None:
    torch.manual_seed(0)
    model = tiny(**overrides).build().eval()
    hf_model = to_hf_model("llama", model.config, model.state_dict(), VOCAB, SPECIAL_IDS)
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    assert hf_model.config.num_key_value_heads == model.config.kv_heads
    with torch.no_grad():
        ours = model(ids())[..., :VOCAB]
        theirs = hf_model(ids()).logits
    assert (ours - theirs).abs().max() <= TOLERANCE


@pytest.mark.parametrize("tied", [False, True])
def test_hf_to_lmexp_logits_and_round_trip(tied: bool) -> None:
    hf_model = hf_llama(tie_word_embeddings=tied)
    family, fields, state_dict = from_hf_model(hf_model)
    assert family == "llama" and fields["tie_embeddings"] is tied
    assert (fields["n_kv_head"], fields["intermediate_size"], fields["rope_theta"]) == (2, 80, 500.0)
    model = LlamaConfig(**fields).build().eval()
    model.load_state_dict(state_dict)  # strict: every parameter is there
    with torch.no_grad():
        assert (model(ids()) - hf_model(ids()).logits).abs().max() <= TOLERANCE
    # ... and back: the Hugging Face weights unchanged.
    back = llama_hf.to_hf_state_dict(model.state_dict(), model.config, VOCAB)
    assert back.keys() == hf_model.state_dict().keys()
    assert all(torch.equal(back[key], value) for key, value in hf_model.state_dict().items())


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}])
def test_lmexp_hf_lmexp_round_trip_keeps_state_dict(overrides: dict) -> None:
    torch.manual_seed(0)
    model = tiny(pad_vocab_to_multiple=1, **overrides).build()
    hf_weights = llama_hf.to_hf_state_dict(model.state_dict(), model.config, VOCAB)
    hf_config = llama_hf.hf_config(model.config, VOCAB, SPECIAL_IDS)
    fields, state_dict = llama_hf.from_hf(hf_config, hf_weights)
    original = model.state_dict()
    assert state_dict.keys() == original.keys()
    assert all(torch.equal(state_dict[key], value) for key, value in original.items())
    rebuilt = LlamaConfig(**fields)
    expected = {**model.config.to_dict(), "intermediate_size": model.config.mlp_hidden_size}
    assert {k: v for k, v in rebuilt.to_dict().items() if k not in ("name", "lora")} == {
        k: v for k, v in expected.items() if k not in ("name", "lora")
    }


def test_padded_vocab_rows_are_dropped() -> None:
    model = tiny(tie_embeddings=False).build()  # 37 -> 64 rows
    weights = llama_hf.to_hf_state_dict(model.state_dict(), model.config, VOCAB)
    assert weights["model.embed_tokens.weight"].shape == weights["lm_head.weight"].shape == (VOCAB, 32)


def test_kv_cache_generation_matches_hf() -> None:
    hf_model = hf_llama()
    _, fields, state_dict = from_hf_model(hf_model)
    model = LlamaConfig(**fields).build().eval()
    model.load_state_dict(state_dict)
    prompt = ids(1, 5)
    with torch.no_grad():
        theirs = hf_model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        caches, sequence = model.new_kv_caches(), prompt
        logits = model(prompt, caches)[:, -1]
        for _ in range(8):
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
            logits = model(sequence[:, -1:], caches)[:, -1]
    assert torch.equal(sequence, theirs)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"attention_bias": True}, "config attention_bias=True cannot be expressed as an lmexp llama"),
        ({"mlp_bias": True}, "config mlp_bias=True"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_parameters="),
        ({"hidden_act": "gelu"}, "config hidden_act='gelu'"),
        ({"head_dim": 16}, "config head_dim=16"),
    ],
)
def test_unsupported_hf_llama_is_one_line(overrides: dict, fragment: str) -> None:
    hf_model = hf_llama(**overrides)
    with pytest.raises(CheckpointError) as excinfo:
        llama_hf.from_hf(hf_model.config, hf_model.state_dict())
    message = str(excinfo.value)
    assert fragment in message and "\n" not in message


def test_mismatched_weights_are_one_line() -> None:
    hf_model = hf_llama()
    weights = dict(hf_model.state_dict())
    weights["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(32, 32)  # 4 kv heads, config says 2
    with pytest.raises(
        CheckpointError, match=r"k_proj.weight has shape \(32, 32\); the config implies \(16, 32\)"
    ):
        llama_hf.from_hf(hf_model.config, weights)
    weights = dict(hf_model.state_dict())
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    with pytest.raises(CheckpointError, match=r"weight model.layers.0.self_attn.q_proj.bias has no place"):
        llama_hf.from_hf(hf_model.config, weights)
    del weights["lm_head.weight"]
    with pytest.raises(CheckpointError, match="state dict has no lm_head.weight"):
        llama_hf.from_hf(hf_model.config, weights)
