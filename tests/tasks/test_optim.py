"""The optimizer a task configures (conf/optim/): decay groups, torch's fused step where it applies."""

from __future__ import annotations

import pytest
import torch

from lmexp.errors import ConfigError
from lmexp.models.gpt import GPTConfig
from lmexp.tasks.optim import OptimizerConfig, decay_parameter_groups, fused_kernel_available


def tiny_config(**overrides) -> GPTConfig:
    sizes = {"n_layer": 2, "n_head": 2, "n_embd": 32, "max_seq_len": 16, "vocab_size": 37}
    return GPTConfig(**{**sizes, **overrides})


def _groups() -> list[dict]:
    return [{"params": [torch.nn.Parameter(torch.zeros(3))]}]


def test_fused_step_where_torch_has_it_and_nothing_forbids_it():
    assert fused_kernel_available(_groups())
    # Lightning's mixed precision refuses to clip gradients for optimizers that unscale them themselves.
    assert not fused_kernel_available(_groups(), autocast=True)
    model = tiny_config().build()
    assert OptimizerConfig().build(model).defaults["fused"] is True
    assert not OptimizerConfig(fused=False).build(model).defaults["fused"]
    assert isinstance(OptimizerConfig(name="sgd", lr=0.1).build(model), torch.optim.SGD)


def test_fused_adamw_takes_the_same_step_as_the_default():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(2)]
    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    grads = [torch.randn(8, 4) for _ in weights]
    fused = torch.optim.AdamW(weights, lr=1e-2, fused=fused_kernel_available([{"params": weights}]))
    plain = torch.optim.AdamW(copies, lr=1e-2)
    for _ in range(3):
        for w, c, g in zip(weights, copies, grads, strict=True):
            w.grad, c.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    for w, c in zip(weights, copies, strict=True):
        torch.testing.assert_close(w, c)


def test_settings_are_checked_together():
    with pytest.raises(ConfigError) as excinfo:
        OptimizerConfig(lr=-1, weight_decay=-0.1, name="lion")
    assert excinfo.value.problems == [
        "optim.name='lion' is not one of adamw, adam, sgd",
        "optim.lr=-1: expected a positive number",
        "optim.weight_decay=-0.1: expected a number >= 0",
    ]
    with pytest.raises(ConfigError, match=r"optim.betas=\[0.9, 1.5\]: expected two numbers in \[0, 1\)"):
        OptimizerConfig(betas=[0.9, 1.5])


@pytest.mark.parametrize("tie", [True, False])
def test_decay_parameter_groups(tie: bool) -> None:
    model = tiny_config(tie_embeddings=tie).build()
    groups = decay_parameter_groups(model, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0

    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)), "a parameter is in more than one group"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(grouped) == trainable

    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    not_decayed = {names[id(p)] for p in groups[1]["params"]}
    assert {"tok_emb.weight", "pos_emb.weight", "ln_f.weight", "ln_f.bias"} <= not_decayed
    assert all(n.endswith(".bias") or ".ln" in n or "_emb" in n or n.startswith("ln_f") for n in not_decayed)
    assert all(
        n.endswith(".weight") and ("attn." in n or "mlp." in n or n == "lm_head.weight") for n in decayed
    )
    assert ("lm_head.weight" in decayed) == (not tie)  # a tied head is the embedding: not decayed
    assert "blocks.0.attn.qkv.weight" in decayed and "blocks.1.mlp.proj.weight" in decayed

    torch.optim.AdamW(groups, lr=1e-3)  # the groups are accepted as they are


def test_decay_groups_skip_frozen() -> None:
    model = tiny_config().build()
    model.pos_emb.weight.requires_grad_(False)
    groups = decay_parameter_groups(model, weight_decay=0.1)
    assert all(p is not model.pos_emb.weight for g in groups for p in g["params"])
