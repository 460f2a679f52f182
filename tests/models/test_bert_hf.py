"""lmexp's BERT <-> Hugging Face BERT (masked LM, pre-training, classifiers, QA): logits (fp32, 1e-4) both
ways, round trips and mismatches."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmexp.errors import CheckpointError, ConfigError
from lmexp.models import bert_hf
from lmexp.models.bert import BERTConfig
from lmexp.models.hf_common import from_hf_model, to_hf_model
from lmexp.tasks.classify import SequenceClassifier
from lmexp.tasks.ner import TokenClassifier

VOCAB = 37
TOLERANCE = 1e-4
SPECIAL_IDS = {"pad_token_id": 0}
LABELS = ["neg", "neutral", "pos"]


def tiny(**overrides) -> BERTConfig:
    kwargs = dict(n_layer=2, n_head=2, n_embd=32, max_seq_len=24, vocab_size=VOCAB, dropout=0.0)
    kwargs.update(overrides)
    return BERTConfig(**kwargs)


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with biases and LayerNorm weights moved off their init (0 and 1), so that a
    mapping mistake shows in the logits."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "ln" in name.lower():
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, token_type_ids and attention_mask (B, T); the second row ends in 4 padding tokens."""
    input_ids = torch.randint(1, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    token_types = torch.zeros_like(input_ids)
    token_types[:, 7:] = 1
    mask = torch.ones_like(input_ids)
    mask[1, 9:] = 0
    return input_ids, token_types, mask


def close(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor | None = None) -> bool:
    if mask is not None:  # real positions only: padded positions' outputs mean nothing
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]
    return bool((ours - theirs).abs().max() <= TOLERANCE)


def test_mlm_lmexp_to_hf_logits() -> None:
    model = randomised(tiny().build())
    hf_model = to_hf_model("bert", model.config, model.state_dict(), VOCAB, SPECIAL_IDS)
    assert type(hf_model).__name__ == "BertForMaskedLM"
    input_ids, token_types, mask = batch()
    with torch.no_grad():
        ours = model(input_ids, token_types, mask)[0][..., :VOCAB]
        theirs = hf_model(input_ids=input_ids, token_type_ids=token_types, attention_mask=mask).logits
    assert close(ours, theirs, mask)


def test_pretrain_export_keeps_the_nsp_head_and_round_trips() -> None:
    model = randomised(tiny(pad_vocab_to_multiple=1).build())
    hf_model = to_hf_model("bert", model.config, model.state_dict(), VOCAB, SPECIAL_IDS, task="pretrain")
    input_ids, token_types, mask = batch()
    with torch.no_grad():
        mlm, nsp = model(input_ids, token_types, mask)
        out = hf_model(input_ids=input_ids, token_type_ids=token_types, attention_mask=mask)
    assert close(mlm, out.prediction_logits, mask) and close(nsp, out.seq_relationship_logits)
    fields, state_dict = bert_hf.from_hf(hf_model.config, hf_model.state_dict())
    original = model.state_dict()
    assert state_dict.keys() == original.keys()
    assert all(torch.equal(state_dict[key], value) for key, value in original.items())
    assert fields == {k: v for k, v in model.config.to_dict().items() if k not in ("name", "lora")}


def test_hf_masked_lm_to_lmexp_logits() -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=24,
    )
    hf_model = randomised(transformers.BertForMaskedLM(config))
    family, fields, state_dict = from_hf_model(hf_model)
    assert family == "bert" and fields["mlp_ratio"] == 2
    model = BERTConfig(**fields).build().eval()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected
    assert sorted(missing) == ["nsp_head.bias", "nsp_head.weight", "pooler.dense.bias", "pooler.dense.weight"]
    input_ids, token_types, mask = batch()
    with torch.no_grad():
        ours = model(input_ids, token_types, mask)[0]
        theirs = hf_model(input_ids=input_ids, token_type_ids=token_types, attention_mask=mask).logits
    assert close(ours, theirs, mask)


@pytest.mark.parametrize(
    ("task", "hf_class"),
    [
        ("classify", "BertForSequenceClassification"),
        ("ner", "BertForTokenClassification"),
        ("qa", "BertForQuestionAnswering"),
    ],
)
def test_fine_tuned_models_both_ways(task: str, hf_class: str) -> None:
    torch.manual_seed(0)
    labels = ["start", "end"] if task == "qa" else LABELS
    head = SequenceClassifier if task == "classify" else TokenClassifier  # a QA head is a 2-label tagger
    model = randomised(head(tiny(pad_vocab_to_multiple=1).build(), len(labels), dropout=0.0))
    hf_model = to_hf_model(
        "bert", model.backbone.config, model.state_dict(), VOCAB, SPECIAL_IDS, task, labels
    )
    assert type(hf_model).__name__ == hf_class
    input_ids, _, mask = batch()
    with torch.no_grad():
        ours = model(input_ids, mask)
        out = hf_model(input_ids=input_ids, attention_mask=mask)
    if task == "qa":
        theirs = torch.stack([out.start_logits, out.end_logits], dim=-1)  # (B, T, 2)
    else:
        theirs = out.logits
        assert hf_model.config.id2label == dict(enumerate(LABELS))
    assert close(ours, theirs, None if task == "classify" else mask)
    # ... and back: the fine-tuned model's state dict, the head included.
    _, state_dict = bert_hf.from_hf(hf_model.config, hf_model.state_dict())
    original = model.state_dict()
    assert state_dict.keys() == original.keys()
    assert all(torch.equal(state_dict[key], value) for key, value in original.items())


def test_pre_ln_bert_cannot_export() -> None:
    with pytest.raises(ConfigError, match="model.norm_first=true"):
        bert_hf.hf_config(tiny(norm_first=True), VOCAB, SPECIAL_IDS)
    with pytest.raises(
        ConfigError, match=r"task=clm of a bert has no Hugging Face model class; expected one of"
    ):
        bert_hf.to_hf_state_dict(tiny().build().state_dict(), tiny(), VOCAB, task="clm")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (
            {"position_embedding_type": "relative_key"},
            "config position_embedding_type='relative_key' cannot be",
        ),
        ({"hidden_act": "gelu_new"}, "config hidden_act='gelu_new'"),
        ({"intermediate_size": 50}, "config intermediate_size=50"),
        ({"is_decoder": True}, "config is_decoder=True"),
    ],
)
def test_unsupported_hf_bert_is_one_line(overrides: dict, fragment: str) -> None:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    for key, value in overrides.items():
        setattr(config, key, value)  # as a config.json from another version would carry them
    hf_model = transformers.BertForMaskedLM(
        transformers.BertConfig(**{**config.to_dict(), "is_decoder": False})
    )
    with pytest.raises(CheckpointError) as excinfo:
        bert_hf.from_hf(config, hf_model.state_dict())
    assert fragment in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_mismatched_weights_are_one_line() -> None:
    model = tiny().build()
    hf_model = to_hf_model("bert", model.config, model.state_dict(), VOCAB, SPECIAL_IDS)
    weights = dict(hf_model.state_dict())
    weights["bert.encoder.layer.1.attention.self.key.weight"] = torch.zeros(32, 16)
    with pytest.raises(
        CheckpointError, match=r"self.key.weight has shape \(32, 16\); the config implies \(32, 32\)"
    ):
        bert_hf.from_hf(hf_model.config, weights)
    without_bert = {key.removeprefix("bert."): value for key, value in hf_model.state_dict().items()}
    with pytest.raises(CheckpointError, match="state dict has no bert.* weights"):
        bert_hf.from_hf(hf_model.config, without_bert)
