"""The model registry: a kind is a config class, a conf/model file and an entry; the backbone contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lmexp.config.compose import config_dir
from lmexp.errors import ConfigError
from lmexp.models.registry import MODELS, spec_for, spec_for_target

SIZES = {
    "gpt": dict(n_layer=1, n_head=2, n_embd=16, max_seq_len=16),
    "bert": dict(n_layer=1, n_head=2, n_embd=16, max_seq_len=16, dropout=0.0),
    "llama": dict(n_layer=1, n_head=2, n_kv_head=1, n_embd=16, max_seq_len=16),
    "lstm": dict(n_layer=1, n_embd=16, hidden_size=24, dropout=0.0),
}


def test_every_shipped_model_config_names_a_registered_kind():
    for path in sorted((Path(config_dir()) / "model").glob("*.yaml")):
        node = OmegaConf.load(path)
        target = node.get("_target_") or node.get("model", {}).get("_target_")
        if target is None:  # a size preset of another file (defaults: [gpt])
            continue
        assert spec_for_target(target).config_type().__name__ == target.rsplit(".", 1)[-1]


def test_unknown_config_class_is_one_line():
    with pytest.raises(ConfigError, match=r"model._target_=my.Model is not a model kind lmexp knows"):
        spec_for_target("my.Model")


def hf_sizes(directory: Path) -> dict:
    """model=hf: a tiny Llama's config.json alone (fresh weights: model.pretrained=false)."""
    from transformers import LlamaConfig

    LlamaConfig(
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, hidden_size=16,
        intermediate_size=32, max_position_embeddings=16, vocab_size=50,
    ).save_pretrained(directory)  # fmt: skip
    return dict(name_or_path=str(directory), pretrained=False)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_backbone_contract(kind, tmp_path):
    spec = MODELS[kind]
    sizes = hf_sizes(tmp_path) if kind == "hf" else SIZES[kind]
    config = spec.config_type()(vocab_size=50, **sizes)
    assert spec_for(config) is spec
    model = config.build().eval()
    ids = torch.randint(4, 50, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    hidden = model.token_states(ids, mask)
    assert hidden.shape == (2, 7, config.hidden_width)
    assert model.pool(hidden, mask).shape == (2, config.hidden_width)
    if kind != "bert":  # causal: padding on the right never reaches a real position
        torch.testing.assert_close(hidden[1, :5], model.token_states(ids[1:, :5], mask[1:, :5])[0])
    assert all(isinstance(unit, torch.nn.Module) for unit in model.shard_units())
    if spec.pretraining == "clm":
        logits, step = model.start_generation(ids)
        assert logits.shape[0] == 2 and step(ids[:, :1]).shape == logits.shape
    model.drop_pretraining_heads(keep_pooler=True)
    assert model.token_states(ids, mask).shape == hidden.shape
