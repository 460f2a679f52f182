"""The chunked output-layer loss against plain logits + cross-entropy, and the models' loss path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmexp.models.gpt import GPTConfig
from lmexp.models.head_loss import IGNORE_INDEX, linear_cross_entropy
from lmexp.models.lstm import LSTMConfig


def _inputs(bias: bool, n: int = 53, c: int = 16, v: int = 40, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, c, generator=generator, requires_grad=True)
    weight = torch.randn(v, c, generator=generator, requires_grad=True)
    bias_ = torch.randn(v, generator=generator, requires_grad=True) if bias else None
    labels = torch.randint(0, v - 5, (n,), generator=generator)
    labels[::4] = IGNORE_INDEX  # rows without a loss must contribute nothing, to the loss or the gradients
    return hidden, weight, bias_, labels


@pytest.mark.parametrize("chunk_rows", [1, 7, 53, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_plain_cross_entropy_in_value_and_gradients(chunk_rows: int, bias: bool) -> None:
    hidden, weight, bias_, labels = _inputs(bias)
    params = [t for t in (hidden, weight, bias_) if t is not None]

    logits = F.linear(hidden, weight, bias_)
    expected = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    expected_grads = torch.autograd.grad(expected * 0.37, params)  # a non-unit upstream gradient

    got = linear_cross_entropy(hidden, weight, bias_, labels, n_classes=35, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(got.nll_sum * 0.37, params)

    torch.testing.assert_close(got.nll_sum, expected, rtol=1e-6, atol=1e-4)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.predictions, logits[:, :35].argmax(dim=-1))
    assert not got.predictions.requires_grad


def test_without_gradients_gives_the_same_loss() -> None:
    hidden, weight, _, labels = _inputs(bias=False)
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, None, labels, chunk_rows=8)
        expected = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    assert not got.nll_sum.requires_grad
    torch.testing.assert_close(got.nll_sum, expected, rtol=1e-6, atol=1e-4)


def test_all_rows_ignored_gives_zero_loss_and_zero_gradients() -> None:
    hidden, weight, _, labels = _inputs(bias=False)
    got = linear_cross_entropy(hidden, weight, None, torch.full_like(labels, IGNORE_INDEX), chunk_rows=8)
    got.nll_sum.backward()
    assert got.nll_sum.item() == 0.0
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_bfloat16_autocast_stays_close_to_the_plain_formula() -> None:
    hidden, weight, _, labels = _inputs(bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy(
            F.linear(hidden, weight).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        got = linear_cross_entropy(hidden, weight, None, labels, chunk_rows=8)
    expected_grad = torch.autograd.grad(expected, weight)[0]
    grad = torch.autograd.grad(got.nll_sum, weight)[0]
    assert grad.dtype == weight.dtype  # gradients in the parameters' dtype, as autocast's own
    torch.testing.assert_close(got.nll_sum, expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad, expected_grad, rtol=5e-2, atol=5e-2)


def test_bad_shapes_name_both() -> None:
    hidden, weight, _, labels = _inputs(bias=False)
    with pytest.raises(ValueError, match=r"hidden \(N, C\) and labels \(N,\), got \(53, 16\) and \(52,\)"):
        linear_cross_entropy(hidden, weight, None, labels[:-1])


@pytest.mark.parametrize(
    "config",
    [
        GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=45, max_seq_len=16),  # tied, no head bias
        LSTMConfig(n_layer=1, n_embd=24, hidden_size=24, vocab_size=45, dropout=0.0),  # tied, head bias
        LSTMConfig(n_layer=1, n_embd=16, hidden_size=24, vocab_size=45, dropout=0.0, tie_embeddings=False),
    ],
    ids=["gpt", "lstm-tied", "lstm-untied"],
)
def test_models_loss_path_equals_logits_then_cross_entropy(config) -> None:
    """``model(x, labels=y)`` must train like cross-entropy over ``model(x)``: the tasks rely on it."""
    torch.manual_seed(0)
    model = config.build()
    input_ids = torch.randint(0, 45, (3, 12))
    labels = torch.randint(0, 45, (3, 12))
    labels[0, :5] = IGNORE_INDEX

    logits = model(input_ids)  # (B, T, V')
    expected = F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))

    nll_sum, predictions = model(input_ids, labels=labels)
    grads = torch.autograd.grad(nll_sum, list(model.parameters()))

    torch.testing.assert_close(nll_sum, expected, rtol=1e-6, atol=1e-4)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
    assert torch.equal(predictions, logits[..., :45].argmax(dim=-1).flatten())


def test_bfloat16_parameters_without_autocast_as_fsdp_mixed_precision_gathers_them() -> None:
    hidden, weight, _, labels = _inputs(bias=False)
    hidden = hidden.detach().bfloat16().requires_grad_()
    weight = weight.detach().bfloat16().requires_grad_()
    expected = F.cross_entropy(
        F.linear(hidden, weight).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, None, labels, chunk_rows=8)
    grads = torch.autograd.grad(got.nll_sum, (hidden, weight))
    torch.testing.assert_close(got.nll_sum, expected, rtol=1e-5, atol=1e-3)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(grad, expected_grad, rtol=2e-2, atol=2e-2)
