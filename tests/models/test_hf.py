"""model=hf: tiny transformers models saved to a directory behind lmexp's backbone contract (no downloads)."""

from __future__ import annotations

import json

import pytest
import torch

from lmexp.data.text_tokenizer import HFTokenizer
from lmexp.errors import ConfigError
from lmexp.models.hf import HFModelConfig
from lmexp.models.registry import MODELS
from tests.models.hf_helpers import DECODERS, FAMILIES, corpus


def wrapped(directory, **settings):
    tokenizer = HFTokenizer.load(directory)
    config = HFModelConfig(name_or_path=str(directory), vocab_size=tokenizer.vocab_size, **settings)
    return config, config.build().eval(), tokenizer


def sample_ids(tokenizer, length: int = 12) -> torch.Tensor:
    rows = [ids[:length] for ids in tokenizer.encode(list(corpus()[:2]))]
    return torch.tensor(rows)  # (2, length)


@pytest.mark.parametrize("family", DECODERS)
def test_chunked_loss_equals_the_models_own(family, hf_model_dir):
    config, model, tokenizer = wrapped(hf_model_dir(family))
    assert config.objective == "clm" and model._head is not None  # the chunked head loss path
    ids = sample_ids(tokenizer)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        loss = model(inputs, labels=labels)
        logits = model.hf(input_ids=inputs).logits  # (B, T, V)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    torch.testing.assert_close(loss.nll_sum, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(loss.predictions, logits.argmax(-1).flatten())


@pytest.mark.parametrize("family", FAMILIES)
def test_shard_units_are_the_decoder_layers(family, hf_model_dir):
    config, model, _ = wrapped(hf_model_dir(family))
    units = model.shard_units()
    assert len(units) == config.n_layer == 2
    assert len({type(unit) for unit in units}) == 1 and "Embedding" not in type(units[0]).__name__


@pytest.mark.parametrize("family", DECODERS)
def test_cached_generation_matches_a_full_forward(family, hf_model_dir):
    _, model, tokenizer = wrapped(hf_model_dir(family))
    ids = sample_ids(tokenizer, 10)
    with torch.no_grad():
        first, step = model.start_generation(ids[:, :6])
        steps = [step(ids[:, i : i + 1]) for i in range(6, 10)]
        full = model(ids)  # (B, T, V)
    torch.testing.assert_close(first, full[:, 5], rtol=1e-4, atol=1e-4)
    for i, logits in enumerate(steps):
        torch.testing.assert_close(logits, full[:, 6 + i], rtol=1e-4, atol=1e-4)


def test_masked_lm_forward_and_pool(hf_model_dir):
    config, model, tokenizer = wrapped(hf_model_dir("bert"))
    assert config.objective == "mlm" and config.layout == "cls_sep"
    assert config.task_problems("clm") and not config.task_problems("mlm")
    ids = sample_ids(tokenizer, 8)
    positions = torch.tensor([1, 3, 9])
    with torch.no_grad():
        at_positions, nsp = model(ids, mlm_positions=positions)
        full = model.hf(input_ids=ids).logits.flatten(0, 1)[positions]
        hidden = model.token_states(ids, torch.ones_like(ids))
    assert nsp is None  # masked LM only
    torch.testing.assert_close(at_positions, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.pool(hidden, torch.ones_like(ids)), hidden[:, 0])


def test_fresh_weights_and_overrides_from_the_config_alone(hf_model_dir):
    config = HFModelConfig(
        name_or_path=str(hf_model_dir("llama")), pretrained=False, config_overrides={"num_hidden_layers": 1}
    )
    assert config.n_layer == 1 and len(config.build().shard_units()) == 1
    with pytest.raises(ConfigError, match=r"model.config_overrides.n_layers is not a setting of LlamaConfig"):
        HFModelConfig(name_or_path=str(hf_model_dir("llama")), config_overrides={"n_layers": 1}).build()


def test_run_tokenizer(hf_model_dir):
    gpt2, bert = HFTokenizer.load(hf_model_dir("gpt2")), HFTokenizer.load(hf_model_dir("bert"))
    assert gpt2.vocab_size == len(gpt2.hf) and gpt2.eos_id == gpt2.bos_id == gpt2.pad_id and not gpt2.has_pad
    assert gpt2.missing(["[MASK]", "[PAD]"]) == ["mask token", "pad token"]
    assert bert.special_id("[MASK]") == bert.hf.mask_token_id and bert.eos_id == bert.hf.sep_token_id
    with pytest.raises(ConfigError, match="has no mask token"):
        gpt2.special_id("[MASK]")
    text = corpus()[0]
    words = len(text.split())
    for tokenizer in (gpt2, bert):
        ids = tokenizer.encode([text])[0]
        assert tokenizer.decode(ids).lower().replace(" ", "") == text.lower().replace(" ", "")
        starts = int(tokenizer.word_start_mask()[ids].sum())
        # byte-level BPE marks every word but the first (the document's eos stands for it)
        assert starts == (words if tokenizer is bert else words - 1)
    assert {f.name for f in gpt2.files} >= {"tokenizer.json", "tokenizer_config.json"}


# ------------------------------------------------------------------------------------ bad input
def test_directory_without_config_json(tmp_path):
    with pytest.raises(ConfigError, match=rf"model.name_or_path={tmp_path} has no config.json"):
        HFModelConfig(name_or_path=str(tmp_path)).hf_config()


def test_architecture_without_a_language_model_head(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    with pytest.raises(ConfigError, match="has no causal-LM or masked-LM head"):
        HFModelConfig(name_or_path=str(tmp_path)).task_problems("clm")


def test_remote_code_needs_trust(tmp_path):
    config = {"model_type": "my-llm", "auto_map": {"AutoModelForCausalLM": "modeling_my.MyLM"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="set model.trust_remote_code=true"):
        HFModelConfig(name_or_path=str(tmp_path)).hf_config()


def test_missing_hub_model_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as excinfo:
        HFModelConfig(name_or_path="nobody-here/no-such-model-xyz").hf_config()
    message = str(excinfo.value)
    assert "model.name_or_path=nobody-here/no-such-model-xyz" in message and "HF_HUB_OFFLINE=1" in message
    assert "\n" not in message


def test_hf_is_registered_for_clm_mlm_and_fine_tuning():
    assert {"clm", "mlm", "classify", "ner"} <= set(MODELS["hf"].tasks) and MODELS["hf"].own_tokenizer


# ------------------------------------------------------------------------------ init_from=hf: import
def imported(source: str, cache_dir):
    """lmexp's own model built from ``init_from=hf:<source>`` (what a run starts from)."""
    from lmexp.config.schema import parse
    from lmexp.models.registry import spec_for_target
    from lmexp.tasks.base import pretrained_weights
    from lmexp.training.build import load_init_from

    pretrained = load_init_from(f"hf:{source}", cache_dir)
    node = dict(pretrained.model_node)
    spec = spec_for_target(node.pop("_target_"))
    model = parse(spec.config_type(), node, "model").build().eval()
    weights = pretrained_weights(pretrained.state_dict)
    model.load_state_dict({k: v for k, v in weights.items() if k in model.state_dict()}, strict=False)
    return spec.kind, model, pretrained


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_import_into_lmexps_own_kind_gives_the_hf_logits_and_round_trips(family, hf_model_dir, cache_dir):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from lmexp.models.hf_common import from_hf_model, to_hf_model

    source = hf_model_dir(family)
    kind, model, pretrained = imported(str(source), cache_dir)
    assert kind == {"gpt2": "gpt", "llama": "llama", "bert": "bert"}[family]
    assert pretrained.tokenizer["tokenizer_dir"] is not None  # the model's own tokenizer comes along
    auto = AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM
    hf = auto.from_pretrained(source).eval()
    ids = torch.tensor([list(range(5, 21))])
    with torch.no_grad():
        ours = model(ids)[0] if family == "bert" else model(ids)
        theirs = hf(input_ids=ids).logits
    assert (ours[..., : theirs.shape[-1]] - theirs).abs().max() <= 1e-4
    # export -> import: the same weights again
    special = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    again = to_hf_model(kind, model.config, model.state_dict(), hf.config.vocab_size, special)
    _, _, state_dict = from_hf_model(again)
    original = model.state_dict()
    assert all(torch.equal(state_dict[k], original[k]) for k in state_dict if k in original)


def test_import_of_other_architectures_is_one_line(hf_model_dir, cache_dir):
    from lmexp.errors import CheckpointError
    from lmexp.training.build import load_init_from

    with pytest.raises((ConfigError, CheckpointError), match=r"^init_from=hf:.*qwen2"):
        load_init_from(f"hf:{hf_model_dir('qwen2')}", cache_dir)


def test_gradient_checkpointing_and_dtype_options(hf_model_dir):
    directory = hf_model_dir("llama")
    grads = []
    for checkpointing in (False, True):
        _, model, tokenizer = wrapped(directory, gradient_checkpointing=checkpointing)
        model.train()
        ids = sample_ids(tokenizer)
        model(ids[:, :-1], labels=ids[:, 1:]).nll_sum.backward()
        grads.append(model.hf.get_input_embeddings().weight.grad)
    assert model.hf.is_activation_checkpointing
    torch.testing.assert_close(grads[0], grads[1])
    _, half, _ = wrapped(directory, dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16
