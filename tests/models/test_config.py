"""The shared model-config base: checks derived from annotations, applied only to the fields a config has."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from lmexp.errors import ConfigError
from lmexp.models.config import ModelConfig


@dataclass
class TinyConfig(ModelConfig):
    """A config with none of n_head, dropout or layer_norm_eps, and an optional size."""

    n_embd: int = 8
    vocab_size: int | None = None
    pad_vocab_to_multiple: int = 1
    max_seq_len: int | None = None
    scale: float = 1.0
    name: str = "tiny"
    presets: ClassVar[dict[str, dict[str, Any]]] = {"small": dict(n_embd=4)}


def test_checks_apply_only_to_fields_present() -> None:
    config = TinyConfig(scale=2)
    assert config.scale == 2.0 and isinstance(config.scale, float)
    with pytest.raises(ConfigError) as excinfo:
        TinyConfig(max_seq_len=0, n_embd=0, name=3)
    assert excinfo.value.problems == [
        "model.name=3: expected a str, got int",
        "model.n_embd=0: expected an int >= 1",
        "model.max_seq_len=0: expected an int >= 1 or null",
    ]


def test_presets_and_vocab_helpers() -> None:
    config = TinyConfig.from_preset("small", vocab_size=10)
    assert config.to_dict() == {
        "n_embd": 4,
        "vocab_size": 10,
        "pad_vocab_to_multiple": 1,
        "max_seq_len": None,
        "scale": 1.0,
        "name": "small",
    }
    assert config.padded_vocab_size == 10
    with pytest.raises(ConfigError, match=r"model preset 'big' is unknown; expected one of \['small'\]"):
        TinyConfig.from_preset("big")


def test_unsupported_annotation_is_a_programming_error() -> None:
    @dataclass
    class BadConfig(ModelConfig):
        sizes: list[int] | None = None

    with pytest.raises(TypeError, match="BadConfig.sizes"):
        BadConfig()
