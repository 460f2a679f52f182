"""lmexp.generate: the KV cache and the LSTM state give exactly what full re-computation gives."""

from __future__ import annotations

import pytest
import torch

from lmexp.errors import ConfigError
from lmexp.inference.generate import filter_logits, generate, generate_ids
from lmexp.models.gpt import GPTConfig
from lmexp.models.lstm import LSTMConfig
from tests.tasks.helpers import compose_tool, pretrained_checkpoint


def small_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt":
        config = GPTConfig(n_layer=2, n_head=2, n_embd=32, max_seq_len=64, vocab_size=50, dropout=0.0)
    else:
        config = LSTMConfig(n_layer=2, n_embd=16, hidden_size=24, vocab_size=50, dropout=0.0)
    return config.build().eval()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_greedy_equals_full_recomputation(kind):
    model = small_model(kind)
    prompt = [3, 7, 11, 19]
    cached = generate_ids(model, prompt, 40, vocab_size=50, eos_id=None, num_samples=2)
    # Reference: argmax over the logits of the whole sequence, recomputed from scratch at every step.
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(40):
            sequence.append(int(model(torch.tensor([sequence]))[0, -1, :50].argmax()))
    assert cached == [sequence[len(prompt) :]] * 2
    assert generate_ids(model, prompt, 40, 50, None, use_cache=False) == [sequence[len(prompt) :]]


def test_kv_cache_logits_match_full_forward():
    model = small_model("gpt")
    ids = torch.randint(0, 50, (2, 12))
    caches = model.new_kv_caches()
    with torch.no_grad():
        parts = [model(ids[:, :5], caches), model(ids[:, 5:9], caches)]  # a prefill, then a block of 4
        parts += [model(ids[:, t : t + 1], caches) for t in range(9, 12)]  # then one token at a time
        assert torch.allclose(torch.cat(parts, dim=1), model(ids), atol=1e-5)


@pytest.mark.slow
def test_sampling_is_seeded_and_stops_at_eos():
    model = small_model("gpt")
    draw = lambda seed: generate_ids(  # noqa: E731
        model, [3, 5], 30, 50, eos_id=None, temperature=1.0, top_k=10, top_p=0.9, num_samples=3,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    first = draw(1)
    assert first == draw(1) and first != draw(2)
    assert len({tuple(row) for row in first}) > 1  # the samples differ from each other
    eos = first[0][4]
    stopped = generate_ids(model, [3, 5], 30, 50, eos_id=eos, temperature=1.0, top_k=10, top_p=0.9,
                           num_samples=3, generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert stopped[0] == first[0][:4] and all(eos not in row for row in stopped)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # the nucleus keeps the most likely tokens until their mass reaches top_p (the crossing one included)
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.75)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.76)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.4)).tolist() == [[False, True, True, True]]


@pytest.mark.slow
def test_generate_from_a_checkpoint(tmp_path_factory, cache_dir, tmp_path, capsys):
    root = tmp_path_factory.getbasetemp() / "pretrained"
    ckpt = pretrained_checkpoint("gpt", root, cache_dir)
    args = [f"ckpt_path={ckpt}", "prompt=the old", "max_new_tokens=12", "num_samples=3", "seed=1"]
    texts = generate(compose_tool("generate", tmp_path, cache_dir, *args))
    assert len(texts) == 3 and all(text.startswith("the old") for text in texts)
    assert capsys.readouterr().out.count("--- sample") == 3
    assert generate(compose_tool("generate", tmp_path, cache_dir, *args)) == texts  # same seed, same text
    with pytest.raises(ConfigError, match="exceeds the model's max_seq_len=32"):
        generate(compose_tool("generate", tmp_path, cache_dir, f"ckpt_path={ckpt}", "max_new_tokens=40"))
    bad_settings = r"temperature=-1: expected a number >= 0 \(0 = greedy\); top_p=0: expected"
    with pytest.raises(ConfigError, match=bad_settings):
        generate(
            compose_tool("generate", tmp_path, cache_dir, f"ckpt_path={ckpt}", "temperature=-1", "top_p=0")
        )
    bert = pretrained_checkpoint("bert", root, cache_dir)
    with pytest.raises(ConfigError, match="generate needs a causal language model"):
        generate(compose_tool("generate", tmp_path, cache_dir, f"ckpt_path={bert}"))
