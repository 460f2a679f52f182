"""The optimizer a task configures: decay groups and torch's fused step where it applies."""

from __future__ import annotations

import functools

import torch

from lmexp.tasks.language_model import fused_kernel_option


def _groups() -> list[dict]:
    return [{"params": [torch.nn.Parameter(torch.zeros(3))]}]


def test_fused_step_when_the_config_leaves_it_open():
    assert fused_kernel_option(functools.partial(torch.optim.AdamW, lr=1e-3, fused=None), _groups()) == {
        "fused": True
    }


def test_explicit_choice_mixed_precision_and_other_optimizers_keep_torchs_default():
    assert fused_kernel_option(functools.partial(torch.optim.AdamW, fused=False), _groups()) == {}
    assert fused_kernel_option(functools.partial(torch.optim.AdamW, foreach=True), _groups()) == {}
    # Lightning's mixed precision refuses to clip gradients for optimizers that unscale them themselves.
    assert fused_kernel_option(functools.partial(torch.optim.AdamW), _groups(), autocast=True) == {}
    assert fused_kernel_option(functools.partial(torch.optim.SGD, lr=0.1), _groups()) == {}


def test_fused_adamw_takes_the_same_step_as_the_default():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(2)]
    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    grads = [torch.randn(8, 4) for _ in weights]
    fused = torch.optim.AdamW(
        weights, lr=1e-2, **fused_kernel_option(functools.partial(torch.optim.AdamW), _groups())
    )
    plain = torch.optim.AdamW(copies, lr=1e-2)
    for _ in range(3):
        for w, c, g in zip(weights, copies, grads, strict=True):
            w.grad, c.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    for w, c in zip(weights, copies, strict=True):
        torch.testing.assert_close(w, c)
