"""LoRA through peft on lmexp's GPT and Llama: only adapters train, merging keeps the outputs."""

from __future__ import annotations

import pytest
import torch

from lmexp.errors import ConfigError
from lmexp.models.bert import BERTConfig
from lmexp.models.gpt import GPTConfig
from lmexp.models.llama import LlamaConfig
from lmexp.models.lora import (
    apply_lora,
    linear_module_names,
    lora_state_dict,
    merge_lora,
    trainable_parameter_count,
)

VOCAB = 37


def gpt():
    return GPTConfig(n_layer=2, n_head=2, n_embd=32, max_seq_len=16, vocab_size=VOCAB).build()


def llama():
    return LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=16, vocab_size=VOCAB).build()


CASES = [(gpt, ["qkv", "proj"]), (llama, ["q_proj", "v_proj"])]


@pytest.mark.parametrize(("build", "target"), CASES, ids=["gpt", "llama"])
def test_only_adapters_train(build, target) -> None:
    torch.manual_seed(0)
    model = apply_lora(build(), r=4, alpha=8, dropout=0.0, target=target)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    n_blocks = len(model.blocks)
    per_block = 3 if target == ["qkv", "proj"] else 2  # gpt: qkv, attn.proj, mlp.proj; llama: q, v
    assert len(trainable) == 2 * per_block * n_blocks
    assert trainable_parameter_count(model) == sum(
        p.numel() for n, p in model.named_parameters() if n in trainable
    )
    assert lora_state_dict(model).keys() == {name.replace(".default", "") for name in trainable}

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 12))
    nll_sum, _ = model(ids, labels=ids.roll(-1, dims=1))
    nll_sum.backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= trainable
    assert any(".lora_B." in name for name in changed)


@pytest.mark.parametrize(("build", "target"), CASES, ids=["gpt", "llama"])
def test_merged_model_equals_adapted_model(build, target) -> None:
    torch.manual_seed(0)
    model = build().eval()
    plain_names = set(model.state_dict())
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        base = model(ids)
    model = apply_lora(model, r=4, alpha=8, dropout=0.1, target=target)
    with torch.no_grad():  # move B off zero, as training would, so the adapters change the outputs
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.1)
    model.eval()
    with torch.no_grad():
        adapted = model(ids)
        merged_model = merge_lora(model)
        merged = merged_model(ids)
    assert set(merged_model.state_dict()) == plain_names
    assert all(
        type(m).__module__.startswith("torch") for m in merged_model.modules() if "Linear" in type(m).__name__
    )
    assert all(p.requires_grad for p in merged_model.parameters())
    assert torch.allclose(adapted, merged, atol=1e-5)
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapters did change the model


def test_target_matching_nothing_lists_the_linear_layers() -> None:
    with pytest.raises(ConfigError) as excinfo:
        apply_lora(llama(), r=4, alpha=8, dropout=0.0, target=["q_proj", "query"])
    message = str(excinfo.value)
    assert message.startswith("lora.target=['q_proj', 'query']: ['query'] match no Linear layer of the model")
    assert message.endswith(
        "expected suffixes of its Linear layers: ['attn.q_proj', 'attn.k_proj', 'attn.v_proj', "
        "'attn.o_proj', 'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj', 'lm_head']"
    )
    assert linear_module_names(gpt()) == ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "lm_head"]


def test_bad_settings_and_output_layer_are_config_errors() -> None:
    with pytest.raises(ConfigError) as excinfo:
        apply_lora(gpt(), r=0, alpha=-1, dropout=1.0, target="qkv")
    assert len(excinfo.value.problems) == 4
    assert "lora.r=0: expected a positive integer" in str(excinfo.value)
    with pytest.raises(ConfigError, match="matches the output layer lm_head"):
        apply_lora(gpt(), r=4, alpha=8, dropout=0.0, target=["lm_head"])
    bert = BERTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB).build()
    with pytest.raises(ConfigError, match="matches mlm_head.decoder, whose weight is tied to tok_emb"):
        apply_lora(bert, r=4, alpha=8, dropout=0.0, target=["decoder"], key="task.lora")
