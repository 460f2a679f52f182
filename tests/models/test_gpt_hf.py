"""lmexp's GPT <-> Hugging Face GPT2LMHeadModel: logits (fp32, 1e-4) both ways, round trip, mismatches."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmexp.errors import CheckpointError, ConfigError
from lmexp.models import gpt_hf
from lmexp.models.gpt import GPTConfig
from lmexp.models.hf_common import from_hf_model, to_hf_model

VOCAB = 37
TOLERANCE = 1e-4
SPECIAL_IDS = {"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 0}


def tiny(**overrides) -> GPTConfig:
    kwargs = dict(n_layer=2, n_head=2, n_embd=32, max_seq_len=24, vocab_size=VOCAB)
    kwargs.update(overrides)
    return GPTConfig(**kwargs)


def hf_gpt2(**overrides) -> transformers.GPT2LMHeadModel:
    """A tiny randomly initialised Hugging Face GPT-2, built offline from a config."""
    kwargs = dict(vocab_size=VOCAB, n_positions=24, n_embd=32, n_layer=2, n_head=2, **SPECIAL_IDS)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return randomised(transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs)))


def ids(batch: int = 2, length: int = 17) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with biases and norm weights moved off their init (0 and 1), so that a
    mapping mistake shows in the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


@pytest.mark.parametrize("tie", [True, False])
def test_lmexp_to_hf_logits(tie: bool) -> None:
    torch.manual_seed(0)
    model = randomised(tiny(tie_embeddings=tie).build())
    hf_model = to_hf_model("gpt", model.config, model.state_dict(), VOCAB, SPECIAL_IDS)
    assert type(hf_model).__name__ == "GPT2LMHeadModel" and hf_model.config.tie_word_embeddings is tie
    with torch.no_grad():
        assert (model(ids())[..., :VOCAB] - hf_model(ids()).logits).abs().max() <= TOLERANCE


@pytest.mark.parametrize("tie", [True, False])
def test_hf_to_lmexp_logits_and_back(tie: bool) -> None:
    hf_model = hf_gpt2(tie_word_embeddings=tie)
    family, fields, state_dict = from_hf_model(hf_model)
    assert family == "gpt" and fields["tie_embeddings"] is tie and fields["pad_vocab_to_multiple"] == 1
    model = GPTConfig(**fields).build().eval()
    model.load_state_dict(state_dict)  # strict
    with torch.no_grad():
        assert (model(ids()) - hf_model(ids()).logits).abs().max() <= TOLERANCE
    back = gpt_hf.to_hf_state_dict(model.state_dict(), model.config, VOCAB)
    hf_weights = {
        k: v for k, v in hf_model.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))
    }
    assert back.keys() == hf_weights.keys()
    assert all(torch.equal(back[key], value) for key, value in hf_weights.items())


@pytest.mark.parametrize("tie", [True, False])
def test_lmexp_hf_lmexp_round_trip_keeps_state_dict(tie: bool) -> None:
    torch.manual_seed(0)
    model = tiny(tie_embeddings=tie, pad_vocab_to_multiple=1, dropout=0.1).build()
    hf_config = gpt_hf.hf_config(model.config, VOCAB, SPECIAL_IDS)
    fields, state_dict = gpt_hf.from_hf(
        hf_config, gpt_hf.to_hf_state_dict(model.state_dict(), model.config, VOCAB)
    )
    original = model.state_dict()
    assert state_dict.keys() == original.keys()
    assert all(torch.equal(state_dict[key], value) for key, value in original.items())
    assert fields == {k: v for k, v in model.config.to_dict().items() if k not in ("name", "lora")}


def test_bias_free_gpt_cannot_export() -> None:
    with pytest.raises(ConfigError, match="model.bias=false cannot be expressed as GPT2LMHeadModel"):
        gpt_hf.hf_config(tiny(bias=False), VOCAB, SPECIAL_IDS)
    with pytest.raises(ConfigError, match=r"task=classify of a gpt has no Hugging Face model class"):
        to_hf_model("gpt", tiny(), tiny().build().state_dict(), VOCAB, SPECIAL_IDS, task="classify")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"scale_attn_by_inverse_layer_idx": True}, "config scale_attn_by_inverse_layer_idx=True cannot be"),
        ({"scale_attn_weights": False}, "config scale_attn_weights=False"),
        ({"activation_function": "relu"}, "config activation_function='relu'"),
        ({"n_inner": 64}, "config n_inner=64"),
    ],
)
def test_unsupported_hf_gpt2_is_one_line(overrides: dict, fragment: str) -> None:
    hf_model = hf_gpt2(**overrides)
    with pytest.raises(CheckpointError) as excinfo:
        gpt_hf.from_hf(hf_model.config, hf_model.state_dict())
    assert fragment in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_mismatched_weights_are_one_line() -> None:
    hf_model = hf_gpt2()
    weights = dict(hf_model.state_dict())
    weights["transformer.wpe.weight"] = torch.zeros(30, 32)
    with pytest.raises(
        CheckpointError, match=r"transformer.wpe.weight has shape \(30, 32\); the config implies"
    ):
        gpt_hf.from_hf(hf_model.config, weights)
    with pytest.raises(CheckpointError, match="model_type='llama' cannot be expressed as an lmexp gpt"):
        gpt_hf.from_hf(transformers.LlamaConfig(hidden_size=32, num_attention_heads=4), weights)
