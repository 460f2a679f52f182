"""Tests for the BERT encoder and its config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmexp.errors import ConfigError
from lmexp.models.bert import BERT, BERTConfig
from lmexp.tasks.optim import decay_parameter_groups

IGNORE = -100


def tiny_config(**overrides) -> BERTConfig:
    """A model small enough to run in milliseconds."""
    kwargs = dict(n_layer=2, n_head=2, n_embd=32, max_seq_len=16, vocab_size=37)
    kwargs.update(overrides)
    return BERTConfig(**kwargs)


def test_output_shapes() -> None:
    torch.manual_seed(0)
    model = tiny_config().build()
    ids = torch.randint(0, 37, (3, 11))
    mlm_logits, nsp_logits = model(ids)
    assert mlm_logits.shape == (3, 11, 64) and mlm_logits.dtype == torch.float32
    assert nsp_logits.shape == (3, 2)
    hidden = model.encode(ids)
    assert hidden.shape == (3, 11, 32)
    assert model.pool(hidden).shape == (3, 32)
    assert model.pool(hidden).abs().max() <= 1.0  # tanh


@pytest.mark.parametrize(
    ("vocab_size", "multiple", "expected"),
    [(37, 64, 64), (64, 64, 64), (65, 64, 128), (30522, 64, 30528), (30522, 1, 30522), (10, 8, 16)],
)
def test_padded_vocab_size(vocab_size: int, multiple: int, expected: int) -> None:
    assert BERTConfig(vocab_size=vocab_size, pad_vocab_to_multiple=multiple).padded_vocab_size == expected


def test_vocab_size_unset() -> None:
    config = BERTConfig()  # allowed: the caller fills vocab_size in later
    with pytest.raises(ConfigError, match="model.vocab_size is not set"):
        config.build()
    with pytest.raises(ConfigError, match="model.vocab_size is not set"):
        BERT(config)


def test_bidirectional() -> None:
    torch.manual_seed(0)
    model = tiny_config().build().eval()  # eval: dropout off, outputs deterministic
    ids = torch.randint(0, 37, (2, 12))
    with torch.no_grad():
        base, _ = model(ids)
        changed = ids.clone()
        changed[:, -1] = (changed[:, -1] + 1) % 37  # only the LAST token changes
        out, _ = model(changed)
    assert not torch.allclose(out[:, 0], base[:, 0]), "position 0 did not see a later token"
    assert not torch.allclose(out[:, 5], base[:, 5])


def test_eval_is_deterministic_and_train_uses_dropout() -> None:
    torch.manual_seed(0)
    model = tiny_config(dropout=0.3).build()
    ids = torch.randint(0, 37, (2, 8))
    model.eval()
    assert torch.equal(model(ids)[0], model(ids)[0])
    model.train()
    assert not torch.equal(model(ids)[0], model(ids)[0])


@pytest.mark.parametrize("norm_first", [False, True])
def test_padding_is_never_attended_to(norm_first: bool) -> None:
    torch.manual_seed(0)
    model = tiny_config(norm_first=norm_first).build().eval()
    n_real, T = 7, 12
    real = torch.randint(0, 37, (2, n_real))
    types = torch.zeros(2, T, dtype=torch.long)
    types[:, 4:n_real] = 1
    mask = torch.zeros(2, T, dtype=torch.long)
    mask[:, :n_real] = 1

    outputs = []
    with torch.no_grad():
        for pad_ids in (torch.zeros(2, T - n_real, dtype=torch.long), torch.randint(0, 37, (2, T - n_real))):
            ids = torch.cat([real, pad_ids], dim=1)  # (2, T): trailing pads
            outputs.append(model(ids, types, mask))
        alone = model(real, types[:, :n_real])  # the unpadded sequence, no mask at all
        unmasked = model(ids, types)  # sanity check: without the mask the pads do leak in
    assert not torch.allclose(unmasked[0][:, :n_real], alone[0], atol=1e-4)
    for mlm, nsp in outputs:
        assert torch.isfinite(mlm).all()
        assert torch.allclose(mlm[:, :n_real], outputs[0][0][:, :n_real], atol=1e-5)
        assert torch.allclose(mlm[:, :n_real], alone[0], atol=1e-5)
        assert torch.allclose(nsp, alone[1], atol=1e-5)


def test_attention_mask_dtypes_and_fully_padded_row() -> None:
    torch.manual_seed(0)
    model = tiny_config().build().eval()
    ids = torch.randint(0, 37, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])  # the second row is all padding
    with torch.no_grad():
        as_long = model(ids, attention_mask=mask)[0]
        as_bool = model(ids, attention_mask=mask.bool())[0]
        as_float = model(ids, attention_mask=mask.float())[0]
    assert torch.isfinite(as_long).all(), "an all-padding row must not produce NaN"
    assert torch.equal(as_long, as_bool) and torch.equal(as_long, as_float)


def test_token_type_ids_change_output() -> None:
    torch.manual_seed(0)
    model = tiny_config().build().eval()
    ids = torch.randint(0, 37, (2, 10))
    types = torch.zeros_like(ids)
    with torch.no_grad():
        default, _ = model(ids)
        zeros, _ = model(ids, types)
        types[:, 5:] = 1
        segmented, _ = model(ids, types)
    assert torch.equal(default, zeros)  # None means all sentence A
    assert not torch.allclose(segmented, zeros)


def test_decoder_is_tied_to_word_embedding() -> None:
    model = tiny_config().build()
    assert model.mlm_head.decoder.weight is model.tok_emb.weight
    assert model.mlm_head.decoder.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    assert model.mlm_head.decoder.bias.shape == (64,)  # its own bias over the padded vocabulary


@pytest.mark.parametrize(
    "overrides", [{}, {"norm_first": True}, {"n_layer": 3}, {"mlp_ratio": 2}, {"type_vocab_size": 1}]
)
def test_num_parameters_matches_built_model(overrides: dict) -> None:
    config = tiny_config(**overrides)
    model = config.build()
    assert config.num_parameters() == model.num_parameters()
    assert model.num_parameters() == sum(p.numel() for p in set(model.parameters()))


@pytest.mark.parametrize(("multiple", "extra_rows"), [(1, 0), (64, 6)])
def test_bert_base_parameter_count(multiple: int, extra_rows: int) -> None:
    config = BERTConfig(  # conf/model/bert-base.yaml
        n_layer=12, n_head=12, n_embd=768, max_seq_len=512, vocab_size=30522, pad_vocab_to_multiple=multiple
    )
    with torch.device("meta"):
        model = BERT(config)
    assert model.tok_emb.weight.is_meta
    count = model.num_parameters()
    assert count == config.num_parameters()
    # HF BertForPreTraining (bert-base-uncased) has 110,106,428 parameters; each padded vocabulary row
    # adds one embedding row (768) and one decoder bias entry.
    assert count == 110_106_428 + extra_rows * 769
    assert count == pytest.approx(110e6, rel=0.01)


def test_config_accepts_int_for_float() -> None:
    config = BERTConfig(dropout=0, layer_norm_eps=1)
    assert isinstance(config.dropout, float) and isinstance(config.layer_norm_eps, float)


def test_input_validation() -> None:
    model = tiny_config().build()
    model(torch.zeros(1, 16, dtype=torch.long))  # exactly max_seq_len is fine
    with pytest.raises(ConfigError, match=r"sequence length 17 exceeds model.max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must have shape"):
        model(torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        model(torch.zeros(2, 8, dtype=torch.long), attention_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match="token_type_ids must have the shape"):
        model(torch.zeros(2, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))


def test_parameter_names_map_to_hf() -> None:
    names = set(dict(tiny_config().build().named_parameters()))
    expected = {
        "tok_emb.weight",
        "pos_emb.weight",
        "type_emb.weight",
        "emb_ln.weight",
        "emb_ln.bias",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.qkv.bias",
        "blocks.0.attn.proj.weight",
        "blocks.0.ln1.weight",
        "blocks.1.mlp.fc.weight",
        "blocks.1.mlp.proj.bias",
        "blocks.1.ln2.bias",
        "pooler.dense.weight",
        "pooler.dense.bias",
        "mlm_head.dense.weight",
        "mlm_head.ln.weight",
        "mlm_head.ln.bias",
        "mlm_head.decoder.bias",
        "nsp_head.weight",
        "nsp_head.bias",
    }
    assert expected <= names
    assert "mlm_head.decoder.weight" not in names  # tied: named_parameters lists tok_emb.weight only
    assert not any(n.startswith("ln_f") for n in names)  # post-LN has no final norm
    assert any(n.startswith("ln_f") for n, _ in tiny_config(norm_first=True).build().named_parameters())


def test_init_follows_bert() -> None:
    torch.manual_seed(0)
    model = BERTConfig(n_layer=8, n_head=4, n_embd=256, vocab_size=1000).build()
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(param == 0), name
        elif ".ln" in name or "_ln" in name:
            assert torch.all(param == 1), name
        else:
            assert param.std().item() == pytest.approx(0.02, rel=0.1), name  # no depth scaling, unlike GPT


def _reference_forward(
    model: BERT, ids: torch.Tensor, types: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT written out op by op as Hugging Face's BertForPreTraining computes it (eager attention, separate
    query/key/value, additive -inf-like mask), reading our weights. Guards the export mapping."""
    cfg = model.config
    C, H = cfg.n_embd, cfg.n_head
    D = C // H
    p = dict(model.named_parameters())

    def ln(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.layer_norm(x, (C,), p[f"{prefix}.weight"], p[f"{prefix}.bias"], cfg.layer_norm_eps)

    def linear(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return x @ p[f"{prefix}.weight"].T + p[f"{prefix}.bias"]

    B, T = ids.shape
    x = p["tok_emb.weight"][ids] + p["pos_emb.weight"][:T] + p["type_emb.weight"][types]
    x = ln(x, "emb_ln")
    extended = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for i in range(cfg.n_layer):
        w, b = p[f"blocks.{i}.attn.qkv.weight"], p[f"blocks.{i}.attn.qkv.bias"]
        q, k, v = (x @ w[j * C : (j + 1) * C].T + b[j * C : (j + 1) * C] for j in range(3))
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(D) + extended
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
        x = ln(linear(context, f"blocks.{i}.attn.proj") + x, f"blocks.{i}.ln1")
        inter = F.gelu(linear(x, f"blocks.{i}.mlp.fc"))  # erf GELU
        x = ln(linear(inter, f"blocks.{i}.mlp.proj") + x, f"blocks.{i}.ln2")
    transformed = ln(F.gelu(linear(x, "mlm_head.dense")), "mlm_head.ln")
    mlm = transformed @ p["tok_emb.weight"].T + p["mlm_head.decoder.bias"]
    pooled = torch.tanh(linear(x[:, 0], "pooler.dense"))
    return mlm, linear(pooled, "nsp_head")


def test_matches_hf_bert_computation() -> None:
    torch.manual_seed(0)
    model = tiny_config(n_head=4).build().eval()
    with torch.no_grad():
        for param in model.parameters():  # move off the identity/zero init so every weight matters
            param.add_(torch.randn_like(param) * 0.1)
    ids = torch.randint(0, 37, (3, 10))
    types = (torch.arange(10) >= 6).long().expand(3, 10)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    with torch.no_grad():
        mlm, nsp = model(ids, types, mask)
        ref_mlm, ref_nsp = _reference_forward(model, ids, types, mask)
    real = mask.bool()
    assert torch.allclose(mlm[real], ref_mlm[real], atol=1e-5)
    assert torch.allclose(nsp, ref_nsp, atol=1e-5)


@pytest.mark.slow
def test_overfits_tiny_batch() -> None:
    torch.manual_seed(0)
    model = tiny_config().build().train()
    optimizer = torch.optim.AdamW(decay_parameter_groups(model, weight_decay=0.01), lr=3e-3)
    original = torch.randint(2, 37, (8, 16))
    masked = torch.rand(8, 16) < 0.3
    inputs = original.masked_fill(masked, 1)  # id 1 plays [MASK]
    labels = original.masked_fill(~masked, IGNORE)
    types = (torch.arange(16) >= 8).long().expand(8, 16)
    nsp_labels = torch.randint(0, 2, (8,))

    def loss_fn() -> torch.Tensor:
        mlm_logits, nsp_logits = model(inputs, types)  # (B, T, V), (B, 2)
        mlm = F.cross_entropy(mlm_logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        return mlm + F.cross_entropy(nsp_logits, nsp_labels)

    initial = loss_fn().item()
    assert initial == pytest.approx(math.log(64) + math.log(2), abs=0.5)  # ~uniform at init
    for _ in range(50):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
    final = loss_fn().item()
    assert final < 0.25 * initial, (initial, final)


def test_mlm_head_at_given_positions_equals_the_full_head_there() -> None:
    from lmexp.tasks.metrics import IGNORE_INDEX
    from lmexp.tasks.mlm import mlm_loss_sum

    torch.manual_seed(0)
    model = tiny_config().build().eval()
    ids = torch.randint(5, 50, (3, 12))
    types = torch.zeros_like(ids)
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 2], labels[1, 5], labels[2, 11] = 7, 8, 9
    full, nsp = model(ids, types, mask)  # (B, T, V)
    mlm_sum, n_masked, logits, masked_labels, nsp_at = mlm_loss_sum(model, ids, types, mask, labels)
    expected_sum = F.cross_entropy(
        full.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    torch.testing.assert_close(logits, full[labels != IGNORE_INDEX])
    torch.testing.assert_close(mlm_sum, expected_sum)
    torch.testing.assert_close(nsp_at, nsp)
    assert int(n_masked) == 3 and masked_labels.tolist() == [7, 8, 9]
