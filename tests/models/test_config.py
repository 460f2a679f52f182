"""The model-config base: vocabulary helpers, and the schema checks every model config inherits."""

from __future__ import annotations

import pytest

from lmexp.errors import ConfigError
from lmexp.models.bert import BERTConfig
from lmexp.models.gpt import GPTConfig
from lmexp.models.lstm import LSTMConfig


@pytest.mark.parametrize("config_class", [GPTConfig, BERTConfig, LSTMConfig])
def test_every_model_config_checks_its_fields_and_names_them(config_class) -> None:
    with pytest.raises(ConfigError) as excinfo:
        config_class(n_layer=0, dropout=1.0, vocab_size="big")
    assert excinfo.value.problems == [
        "model.n_layer=0: expected a positive integer",
        "model.vocab_size='big': expected an int or null, got str",
        "model.dropout=1.0: expected a number in [0, 1)",
    ]


def test_cross_field_check_runs_once_fields_are_right() -> None:
    with pytest.raises(ConfigError) as excinfo:
        GPTConfig(n_embd=100, n_head=3)
    assert excinfo.value.problems == ["model.n_embd=100 is not divisible by model.n_head=3"]


def test_vocabulary_padding_and_hidden_width() -> None:
    assert GPTConfig(vocab_size=50257).padded_vocab_size == 50304
    assert LSTMConfig(hidden_size=96).hidden_width == 96
    assert BERTConfig(n_embd=64).hidden_width == 64
    with pytest.raises(ConfigError, match="model.vocab_size is not set"):
        GPTConfig().padded_vocab_size  # noqa: B018


@pytest.mark.parametrize(
    ("config_class", "overrides", "fragment"),
    [
        (GPTConfig, {"n_layer": True}, "model.n_layer=True: expected an int"),
        (GPTConfig, {"n_head": 0}, "model.n_head=0: expected a positive integer"),
        (GPTConfig, {"max_seq_len": 2.0}, "model.max_seq_len=2.0: expected an int"),
        (GPTConfig, {"vocab_size": 0}, "model.vocab_size=0"),
        (GPTConfig, {"vocab_size": "100"}, "model.vocab_size='100'"),
        (GPTConfig, {"pad_vocab_to_multiple": 0}, "model.pad_vocab_to_multiple=0"),
        (GPTConfig, {"dropout": 1.0}, "model.dropout=1.0: expected a number in [0, 1)"),
        (GPTConfig, {"dropout": "0.1"}, "model.dropout='0.1': expected a number"),
        (GPTConfig, {"bias": "true"}, "model.bias='true': expected true or false"),
        (GPTConfig, {"tie_embeddings": 1}, "model.tie_embeddings=1: expected true or false"),
        (GPTConfig, {"layer_norm_eps": 0}, "model.layer_norm_eps=0: expected a positive number"),
        (GPTConfig, {"n_layer": None}, "model.n_layer=None"),
        (BERTConfig, {"n_layer": True}, "model.n_layer=True: expected an int"),
        (BERTConfig, {"n_head": 0}, "model.n_head=0: expected a positive integer"),
        (BERTConfig, {"max_seq_len": 2.0}, "model.max_seq_len=2.0: expected an int"),
        (BERTConfig, {"type_vocab_size": None}, "model.type_vocab_size=None"),
        (BERTConfig, {"vocab_size": 0}, "model.vocab_size=0"),
        (BERTConfig, {"pad_vocab_to_multiple": 0}, "model.pad_vocab_to_multiple=0"),
        (BERTConfig, {"dropout": 1.0}, "model.dropout=1.0: expected a number in [0, 1)"),
        (BERTConfig, {"norm_first": "false"}, "model.norm_first='false': expected true or false"),
        (BERTConfig, {"layer_norm_eps": 0}, "model.layer_norm_eps=0: expected a positive number"),
        (BERTConfig, {"mlp_ratio": 0}, "model.mlp_ratio=0: expected a positive integer"),
        (BERTConfig, {"mlp_ratio": 2.5}, "model.mlp_ratio=2.5: expected an int"),
        (BERTConfig, {"name": 3}, "model.name=3: expected a string"),
        (LSTMConfig, {"n_embd": True}, "model.n_embd=True: expected an int"),
        (LSTMConfig, {"vocab_size": 0}, "model.vocab_size=0"),
        (LSTMConfig, {"max_seq_len": "64"}, "model.max_seq_len='64': expected an int or null"),
        (LSTMConfig, {"dropout": 1.0}, "model.dropout=1.0: expected a number in [0, 1)"),
        (LSTMConfig, {"tie_embeddings": 1}, "model.tie_embeddings=1: expected true or false"),
        (LSTMConfig, {"pad_vocab_to_multiple": None}, "model.pad_vocab_to_multiple=None"),
    ],
)
def test_bad_values_are_named(config_class, overrides: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        config_class(**overrides)
    assert fragment in str(excinfo.value) and "\n" not in str(excinfo.value)
