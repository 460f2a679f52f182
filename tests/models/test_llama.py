"""Tests for the Llama-style decoder: config checks, sizes, causality, RoPE, GQA and the KV cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmexp.errors import ConfigError
from lmexp.models.llama import Llama, LlamaConfig, apply_rope, rope_cos_sin, swiglu_hidden_size
from lmexp.tasks.optim import decay_parameter_groups
from lmexp.training.perf import attention_flops_per_token, flops_per_token, matmul_parameters


def tiny_config(**overrides) -> LlamaConfig:
    """A model small enough to run in milliseconds: 4 query heads sharing 2 key/value heads."""
    kwargs = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=24, vocab_size=37)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def test_output_shape_and_padded_vocab() -> None:
    torch.manual_seed(0)
    logits = tiny_config().build()(torch.randint(0, 37, (3, 11)))
    assert logits.shape == (3, 11, 64) and logits.dtype == torch.float32
    assert tiny_config(pad_vocab_to_multiple=1).build()(torch.zeros(1, 2, dtype=torch.long)).shape[-1] == 37


def test_no_biases_and_gqa_shapes() -> None:
    model = tiny_config().build()
    assert all(not name.endswith(".bias") for name, _ in model.named_parameters())
    attn = model.blocks[0].attn
    assert attn.q_proj.weight.shape == (32, 32)  # H * D = 4 * 8
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (16, 32)  # K * D = 2 * 8
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 2


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": False},
        {"n_kv_head": None},
        {"n_kv_head": 1},
        {"intermediate_size": 50},
        {"n_layer": 3, "mlp_multiple_of": 256},
    ],
)
def test_num_parameters_matches_built_model(overrides: dict) -> None:
    config = tiny_config(**overrides)
    model = config.build()
    assert config.num_parameters() == model.num_parameters()
    assert model.num_parameters() == sum(p.numel() for p in set(model.parameters()))


def test_tied_and_untied_embeddings() -> None:
    tied, untied = tiny_config().build(), tiny_config(tie_embeddings=False).build()
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_parameters() == tied.num_parameters() + 64 * 32


@pytest.mark.parametrize(("n_embd", "expected"), [(128, 384), (768, 2048), (32, 128)])
def test_swiglu_hidden_size(n_embd: int, expected: int) -> None:
    assert swiglu_hidden_size(n_embd, 64) == expected
    assert swiglu_hidden_size(4096, 256) == 11008  # Llama 2 7B's intermediate_size
    assert tiny_config(n_embd=n_embd, n_head=4).mlp_hidden_size == expected


def test_config_error_lists_all_problems() -> None:
    with pytest.raises(ConfigError) as excinfo:
        LlamaConfig(n_embd=24, n_head=8, n_kv_head=3, dropout=-0.1, rope_theta=0)
    message = str(excinfo.value)
    assert excinfo.value.problems == [
        "model.rope_theta=0: expected a positive number",
        "model.dropout=-0.1: expected a number in [0, 1)",
        "model.n_kv_head=3 does not divide model.n_head=8",
    ], message
    with pytest.raises(
        ConfigError, match=r"model.n_embd=24 / model.n_head=8 = 3: expected an even head size"
    ):
        LlamaConfig(n_embd=24, n_head=8)
    assert "\n" not in message


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"n_kv_head": 0}, "model.n_kv_head=0: expected a positive integer"),
        ({"n_kv_head": "2"}, "model.n_kv_head='2': expected an int or null, got str"),
        ({"n_embd": 30, "n_head": 4}, "model.n_embd=30 is not divisible by model.n_head=4"),
        ({"norm_eps": -1.0}, "model.norm_eps=-1.0: expected a positive number"),
        ({"intermediate_size": 0}, "model.intermediate_size=0"),
        ({"tie_embeddings": "yes"}, "model.tie_embeddings='yes': expected true or false"),
    ],
)
def test_config_rejects_bad_values(overrides: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        LlamaConfig(**overrides)
    assert fragment in str(excinfo.value)


def test_vocab_size_unset() -> None:
    with pytest.raises(ConfigError, match="model.vocab_size is not set"):
        LlamaConfig().build()


def shipped(name: str, **overrides) -> LlamaConfig:
    """The size of conf/model/<name>.yaml."""
    from omegaconf import OmegaConf

    from lmexp.config.compose import config_dir

    node = OmegaConf.merge(*(OmegaConf.load(f"{config_dir()}/model/{n}.yaml") for n in ("llama", name)))
    values = {k: v for k, v in OmegaConf.to_container(node).items() if k not in ("defaults", "_target_")}
    values["max_seq_len"] = overrides.pop("max_seq_len", 1024) if name == "llama" else values["max_seq_len"]
    return LlamaConfig(**{**values, **overrides})


def test_shipped_sizes_on_meta_device() -> None:
    nano = shipped("llama", vocab_size=100)
    assert (nano.n_layer, nano.n_head, nano.kv_heads, nano.n_embd, nano.mlp_hidden_size) == (
        4,
        4,
        2,
        128,
        384,
    )
    # GPT-2's vocabulary (padded to 50304), as the GPU presets would be compared with gpt2-small/-medium.
    for name, expected in (("llama-124m", 121_228_032), ("llama-350m", 340_968_448)):
        config = shipped(name, vocab_size=50257)
        with torch.device("meta"):
            model = config.build()
        assert model.tok_emb.weight.is_meta
        assert config.num_parameters() == model.num_parameters() == expected


def test_flops_per_token() -> None:
    config = tiny_config()
    model = config.build()
    # Every parameter takes part in a matmul (the tied head counts the embedding), plus attention scores.
    assert matmul_parameters(model) == model.num_parameters()
    assert attention_flops_per_token(config, 24) == 12 * 2 * 32 * 24
    assert flops_per_token(config, 24) == 6 * model.num_parameters() + 12 * 2 * 32 * 24


def test_causality() -> None:
    torch.manual_seed(0)
    model = tiny_config(dropout=0.1).build().eval()
    ids = torch.randint(0, 37, (2, 12))
    with torch.no_grad():
        base = model(ids)
        for k in (0, 5, 11):
            changed = ids.clone()
            changed[:, k] = (changed[:, k] + 1) % 37
            out = model(changed)
            assert torch.equal(out[:, :k], base[:, :k]), f"positions before {k} saw token {k}"
            assert not torch.allclose(out[:, k], base[:, k])


def test_rope_is_a_rotation_that_depends_on_relative_position() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def rotated(x: torch.Tensor, position: int) -> torch.Tensor:
        return apply_rope(x, *rope_cos_sin(torch.tensor([position]), head_size=8, theta=10000.0))

    assert torch.allclose(rotated(q, 0), q)  # position 0: no rotation
    assert torch.allclose(rotated(q, 7).norm(), q.norm())  # a rotation keeps the norm
    scores = [(rotated(q, m) * rotated(k, m - 3)).sum() for m in (3, 10, 50)]
    assert torch.allclose(torch.stack(scores), scores[0].expand(3), atol=1e-5)  # only m - n matters


def test_labels_give_the_summed_cross_entropy() -> None:
    torch.manual_seed(0)
    model = tiny_config().build()
    ids, labels = torch.randint(0, 37, (2, 9)), torch.randint(0, 37, (2, 9))
    labels[0, :3] = -100
    nll_sum, predictions = model(ids, labels=labels)
    logits = model(ids)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    assert torch.allclose(nll_sum, expected, atol=1e-4)
    assert torch.equal(predictions, logits[..., :37].argmax(-1).flatten())


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_kv_cache_matches_full_recomputation(n_kv_head: int) -> None:
    torch.manual_seed(0)
    model = tiny_config(n_kv_head=n_kv_head).build().eval()
    ids = torch.randint(0, 37, (2, 13))
    with torch.no_grad():
        full = model(ids)
        caches = model.new_kv_caches()
        parts = [model(ids[:, a:b], caches) for a, b in ((0, 5), (5, 6), (6, 13))]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
    assert caches[0].keys.shape == (2, n_kv_head, 13, 8)  # only the K key/value heads are cached


def test_greedy_decoding_with_cache_equals_argmax_of_recomputation() -> None:
    torch.manual_seed(0)
    model = tiny_config(n_layer=3).build().eval()
    prompt = torch.randint(0, 37, (2, 4))
    with torch.no_grad():
        caches = model.new_kv_caches()
        logits = model(prompt, caches)[:, -1, :37]
        cached, recomputed = prompt, prompt
        for _ in range(12):
            cached = torch.cat([cached, logits.argmax(-1, keepdim=True)], dim=1)
            logits = model(cached[:, -1:], caches)[:, -1, :37]  # only the new token
            reference = model(recomputed)[:, -1, :37].argmax(-1, keepdim=True)
            recomputed = torch.cat([recomputed, reference], dim=1)
    assert torch.equal(cached, recomputed)


def test_sequence_longer_than_max_seq_len() -> None:
    model = tiny_config(max_seq_len=8).build()
    model(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"sequence length 9 exceeds model.max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    caches = model.new_kv_caches()
    model(torch.zeros(1, 6, dtype=torch.long), caches)
    with pytest.raises(ConfigError, match=r"sequence length 9 exceeds"):
        model(torch.zeros(1, 3, dtype=torch.long), caches)


def test_init_and_decay_groups() -> None:
    torch.manual_seed(0)
    model = LlamaConfig(n_layer=8, n_head=4, n_embd=256, vocab_size=64).build()
    mlp = model.blocks[0].mlp
    assert mlp.gate_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert mlp.down_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # 0.02 / sqrt(2 * 8)
    assert model.blocks[0].attn.o_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(256))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = decay_parameter_groups(model, 0.1)
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert not_decayed == {"tok_emb.weight", "norm.weight"} | {
        f"blocks.{i}.{norm}.weight" for i in range(8) for norm in ("attn_norm", "mlp_norm")
    }


@pytest.mark.slow  # trains
def test_overfits_tiny_batch() -> None:
    torch.manual_seed(0)
    model = tiny_config().build().train()
    optimizer = torch.optim.AdamW(decay_parameter_groups(model, weight_decay=0.01), lr=1e-2)
    data = torch.randint(0, 37, (4, 17))
    inputs, targets = data[:, :-1], data[:, 1:]
    initial = None
    for _ in range(50):
        optimizer.zero_grad(set_to_none=True)
        nll_sum, _ = model(inputs, labels=targets)
        loss = nll_sum / targets.numel()
        initial = initial or loss.item()
        loss.backward()
        optimizer.step()
    assert initial == pytest.approx(torch.log(torch.tensor(64.0)).item(), abs=0.5)
    assert loss.item() < 0.25 * initial
    assert isinstance(model, Llama)
