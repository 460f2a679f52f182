"""Tests for the GPT model, its config and the shared layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmexp.errors import ConfigError
from lmexp.models.gpt import GPT, GPTConfig
from lmexp.models.layers import Block, SelfAttention
from lmexp.tasks.optim import decay_parameter_groups


def tiny_config(**overrides) -> GPTConfig:
    """A model small enough to run in milliseconds."""
    kwargs = dict(n_layer=2, n_head=2, n_embd=32, max_seq_len=16, vocab_size=37)
    kwargs.update(overrides)
    return GPTConfig(**kwargs)


def test_output_shape() -> None:
    torch.manual_seed(0)
    model = tiny_config().build()
    logits = model(torch.randint(0, 37, (3, 11)))
    assert logits.shape == (3, 11, 64)
    assert logits.dtype == torch.float32


@pytest.mark.parametrize(
    ("vocab_size", "multiple", "expected"),
    [(37, 64, 64), (64, 64, 64), (65, 64, 128), (50257, 64, 50304), (50257, 1, 50257), (10, 8, 16)],
)
def test_padded_vocab_size(vocab_size: int, multiple: int, expected: int) -> None:
    assert GPTConfig(vocab_size=vocab_size, pad_vocab_to_multiple=multiple).padded_vocab_size == expected


def test_vocab_size_unset() -> None:
    config = GPTConfig()  # allowed: the caller fills vocab_size in later
    with pytest.raises(ConfigError, match="model.vocab_size is not set"):
        config.build()
    with pytest.raises(ConfigError, match="model.vocab_size is not set"):
        GPT(config)


def test_causality() -> None:
    torch.manual_seed(0)
    model = tiny_config(dropout=0.1).build().eval()  # eval: dropout must be off, outputs deterministic
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


def test_tied_embeddings_share_storage() -> None:
    tied = tiny_config(tie_embeddings=True).build()
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()

    untied = tiny_config(tie_embeddings=False).build()
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.num_parameters() == tied.num_parameters() + 64 * 32


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}, {"bias": False}, {"n_layer": 3}])
def test_num_parameters_matches_built_model(overrides: dict) -> None:
    config = tiny_config(**overrides)
    model = config.build()
    assert config.num_parameters() == model.num_parameters()
    assert model.num_parameters() == sum(p.numel() for p in set(model.parameters()))


def test_config_accepts_int_for_float() -> None:
    config = GPTConfig(dropout=0, layer_norm_eps=1, vocab_size=None)
    assert isinstance(config.dropout, float) and config.dropout == 0.0
    assert isinstance(config.layer_norm_eps, float)


def test_sequence_longer_than_max_seq_len() -> None:
    model = tiny_config().build()
    model(torch.zeros(1, 16, dtype=torch.long))  # exactly max_seq_len is fine
    with pytest.raises(ConfigError, match=r"sequence length 17 exceeds model.max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gpt2_small_parameter_count() -> None:
    # conf/model/gpt2-small.yaml
    config = GPTConfig(n_layer=12, n_head=12, n_embd=768, max_seq_len=1024, vocab_size=50257)
    with torch.device("meta"):
        model = GPT(config)
    assert model.tok_emb.weight.is_meta
    count = model.num_parameters()
    assert count == config.num_parameters()
    # HF gpt2 has 124,439,808 parameters with vocab 50257; padding to 50304 adds 47 * 768.
    assert count == 124_439_808 + 47 * 768


def test_parameter_names_map_to_hf() -> None:
    names = set(dict(tiny_config(tie_embeddings=False).build().named_parameters()))
    expected = {
        "tok_emb.weight",
        "pos_emb.weight",
        "blocks.0.ln1.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.bias",
        "blocks.1.ln2.bias",
        "blocks.1.mlp.fc.weight",
        "blocks.1.mlp.proj.weight",
        "ln_f.weight",
        "lm_head.weight",
    }
    assert expected <= names
    assert "lm_head.bias" not in names


def test_residual_projection_init_is_scaled() -> None:
    torch.manual_seed(0)
    model = GPTConfig(n_layer=8, n_head=4, n_embd=256, vocab_size=64).build()
    fc_std = model.blocks[0].mlp.fc.weight.std().item()
    proj_std = model.blocks[0].mlp.proj.weight.std().item()
    assert fc_std == pytest.approx(0.02, rel=0.05)
    assert proj_std == pytest.approx(0.02 / 4, rel=0.05)  # 0.02 / sqrt(2 * 8)


def test_self_attention_padding_mask() -> None:
    torch.manual_seed(0)
    attn = SelfAttention(n_embd=16, n_head=2, dropout=0.0, bias=True, causal=False).eval()
    x = torch.randn(2, 6, 16)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[:, 4:] = False  # the last two positions are padding
    mask = keep[:, None, None, :]  # (B, 1, 1, T)
    y = attn(x, mask)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 2, 16)  # changing padded positions must not affect the rest
    y2 = attn(x2, mask)
    assert torch.allclose(y[:, :4], y2[:, :4], atol=1e-6)

    with pytest.raises(ValueError, match="non-causal"):
        SelfAttention(16, 2, 0.0, True, causal=True)(x, mask)


def test_post_ln_block_ends_with_layer_norm() -> None:
    torch.manual_seed(0)
    block = Block(n_embd=16, n_head=2, dropout=0.0, bias=True, causal=False, norm_first=False).eval()
    y = block(torch.randn(3, 5, 16) * 10)
    # Post-LN output is normalised per position (LayerNorm at identity init).
    assert torch.allclose(y.mean(-1), torch.zeros(3, 5), atol=1e-5)
    assert torch.allclose(y.var(-1, unbiased=False), torch.ones(3, 5), atol=1e-3)


@pytest.mark.slow
def test_overfits_tiny_batch() -> None:
    torch.manual_seed(0)
    model = tiny_config().build().train()
    optimizer = torch.optim.AdamW(decay_parameter_groups(model, weight_decay=0.01), lr=1e-2)
    data = torch.randint(0, 37, (4, 17))
    inputs, targets = data[:, :-1], data[:, 1:]

    def loss_fn() -> torch.Tensor:
        logits = model(inputs)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    initial = loss_fn().item()
    assert initial == pytest.approx(torch.log(torch.tensor(64.0)).item(), abs=0.5)  # ~uniform at init
    for _ in range(50):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
    final = loss_fn().item()
    assert final < 0.25 * initial, (initial, final)
    assert isinstance(model, nn.Module)
