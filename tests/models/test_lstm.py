"""Tests for the LSTM language model and its config."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from lmexp.errors import ConfigError
from lmexp.models.lstm import LSTMLM, LSTMConfig
from lmexp.tasks.optim import decay_parameter_groups


def tiny_config(**overrides) -> LSTMConfig:
    """A model small enough to run in milliseconds."""
    kwargs = dict(n_layer=2, n_embd=32, hidden_size=48, vocab_size=37)
    kwargs.update(overrides)
    return LSTMConfig(**kwargs)


def test_output_shape() -> None:
    torch.manual_seed(0)
    logits = tiny_config().build()(torch.randint(0, 37, (3, 11)))
    assert logits.shape == (3, 11, 64)
    assert logits.dtype == torch.float32


@pytest.mark.parametrize(
    ("vocab_size", "multiple", "expected"), [(37, 64, 64), (64, 64, 64), (65, 64, 128), (37, 1, 37)]
)
def test_padded_vocab_size(vocab_size: int, multiple: int, expected: int) -> None:
    assert LSTMConfig(vocab_size=vocab_size, pad_vocab_to_multiple=multiple).padded_vocab_size == expected


def test_vocab_size_unset() -> None:
    config = LSTMConfig()
    with pytest.raises(ConfigError, match="model.vocab_size is not set"):
        config.build()
    with pytest.raises(ConfigError, match="model.vocab_size is not set"):
        LSTMLM(config)


@pytest.mark.slow
def test_causality() -> None:
    torch.manual_seed(0)
    model = tiny_config().build().eval()
    T = 12
    ids = torch.randint(0, 37, (2, T))
    with torch.no_grad():
        base = model(ids)
        for k in (0, 5, T - 1):
            changed = ids.clone()
            changed[:, k] = (changed[:, k] + 1) % 37
            out = model(changed)
            assert torch.equal(out[:, :k], base[:, :k]), f"positions before {k} saw token {k}"
            assert not torch.allclose(out[:, k], base[:, k]), f"position {k} ignored its own token"


def test_no_position_limit() -> None:
    model = tiny_config(max_seq_len=8).build().eval()
    assert model(torch.zeros(1, 20, dtype=torch.long)).shape == (1, 20, 64)  # max_seq_len is not enforced


@pytest.mark.parametrize(("hidden_size", "has_proj"), [(48, True), (32, False)])
def test_tied_head(hidden_size: int, has_proj: bool) -> None:
    model = tiny_config(hidden_size=hidden_size).build()
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    assert (model.proj is not None) == has_proj
    if has_proj:
        assert model.proj.weight.shape == (32, hidden_size)


def test_untied_head() -> None:
    model = tiny_config(tie_embeddings=False).build()
    assert model.proj is None
    assert model.lm_head.weight is not model.tok_emb.weight
    assert model.lm_head.weight.shape == (64, 48)  # straight from the hidden state


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": False},
        {"hidden_size": 32},
        {"n_layer": 1},
        {"n_layer": 3},
        {"pad_vocab_to_multiple": 1},
    ],
)
def test_num_parameters_matches_built_model(overrides: dict) -> None:
    config = tiny_config(**overrides)
    model = config.build()
    assert config.num_parameters() == model.num_parameters()
    assert model.num_parameters() == sum(p.numel() for p in set(model.parameters()))


def test_default_parameter_count_on_meta() -> None:
    config = LSTMConfig(vocab_size=8000)
    with torch.device("meta"):
        model = LSTMLM(config)
    # 8000 * 128 embedding, layer 0: 4*256*(128+256) + 2*4*256, layer 1: 4*256*(256+256) + 2*4*256,
    # projection 256 * 128, head bias 8000.
    expected = 8000 * 128 + (4 * 256 * 384 + 2048) + (4 * 256 * 512 + 2048) + 256 * 128 + 8000
    assert model.num_parameters() == config.num_parameters() == expected


def test_forget_gate_bias_init() -> None:
    model = tiny_config().build()
    H = 48
    for layer in range(2):
        bias = getattr(model.lstm, f"bias_ih_l{layer}") + getattr(model.lstm, f"bias_hh_l{layer}")
        assert torch.all(bias[H : 2 * H] == 1.0)
        assert torch.all(bias[:H] == 0) and torch.all(bias[2 * H :] == 0)


@pytest.mark.slow
def test_init() -> None:
    torch.manual_seed(0)
    model = LSTMConfig(vocab_size=1000, hidden_size=256, n_embd=128).build()
    assert model.tok_emb.weight.std().item() == pytest.approx(0.1, rel=0.05)
    assert model.proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(model.lm_head.bias == 0)
    for E, H in ((128, 256), (128, 128)):  # with and without the projection: ~uniform predictions at init
        model = LSTMConfig(vocab_size=1000, n_embd=E, hidden_size=H).build().eval()
        ids = torch.randint(0, 1000, (2, 32))
        with torch.no_grad():
            loss = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        assert loss.item() == pytest.approx(math.log(1024), abs=0.5), (E, H)


def test_single_layer_has_no_inter_layer_dropout_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = tiny_config(n_layer=1, dropout=0.2).build()
    assert model.lstm.dropout == 0.0
    assert tiny_config(n_layer=2, dropout=0.2).build().lstm.dropout == 0.2


def test_config_fields() -> None:
    config = LSTMConfig(dropout=0, max_seq_len=128)
    assert isinstance(config.dropout, float) and config.max_seq_len == 128
    assert LSTMConfig().max_seq_len is None


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="input_ids must have shape"):
        tiny_config().build()(torch.zeros(5, dtype=torch.long))


@pytest.mark.slow
def test_overfits_tiny_batch() -> None:
    torch.manual_seed(0)
    model = tiny_config(n_embd=64, hidden_size=128).build().train()
    optimizer = torch.optim.AdamW(decay_parameter_groups(model, weight_decay=0.01), lr=2e-2)
    data = torch.randint(0, 37, (4, 17))
    inputs, targets = data[:, :-1], data[:, 1:]

    def loss_fn() -> torch.Tensor:
        logits = model(inputs)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    initial = loss_fn().item()
    assert initial == pytest.approx(math.log(64), abs=0.5)  # ~uniform at init
    for _ in range(50):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
    final = loss_fn().item()
    assert final < 0.3 * initial, (initial, final)
