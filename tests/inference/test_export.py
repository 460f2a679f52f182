"""lmexp.export: transformers models with lmexp's logits (fp32, 1e-4) and tokenizers with lmexp's ids."""

from __future__ import annotations

import sys

import pytest
import torch

from lmexp.errors import ConfigError
from lmexp.inference.export import export, lmexp_logits
from lmexp.inference.restore import restore_run
from tests.tasks.helpers import compose_tool, finetune, pretrained_checkpoint

TEXTS = [
    "the old dog sat near the red bus.",
    "  Leading,   repeated\tand trailing whitespace  ",
    "Unicode outside the corpus: Zürich, 東京, emoji 🎉🦘 and 𝔘𝔫𝔦",  # byte fallback
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ ① (NFKC)",
    "",
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, cache_dir):
    root = tmp_path_factory.getbasetemp()
    gpt = pretrained_checkpoint("gpt", root / "pretrained", cache_dir)
    bert = pretrained_checkpoint("bert", root / "pretrained", cache_dir)
    short = ["trainer.max_steps=4", "trainer.val_check_interval=4", "run_test=false"]
    classify = finetune(bert, "classify", root / "export-runs", cache_dir, *short)
    ner = finetune(bert, "ner", root / "export-runs", cache_dir, *short)
    ckpt = "checkpoints/last.ckpt"
    return {"gpt": gpt, "bert": bert, "classify": classify / ckpt, "ner": ner / ckpt}


def exported(name, checkpoints, tmp_path, cache_dir):
    out = tmp_path / f"hf-{name}"
    export(compose_tool("export", tmp_path, cache_dir, f"ckpt_path={checkpoints[name]}", f"out={out}"))
    return out, restore_run(checkpoints[name], cache_dir)


def padded_batch(rows, pad_id):
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return ids, mask


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # everything must load from the exported directory


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "hf_class"),
    [
        ("gpt", "GPT2LMHeadModel"),
        ("bert", "BertForMaskedLM"),
        ("classify", "BertForSequenceClassification"),
        ("ner", "BertForTokenClassification"),
    ],
)
def test_exported_model_matches_lmexp(name, hf_class, checkpoints, tmp_path, cache_dir):
    import transformers

    out, run = exported(name, checkpoints, tmp_path, cache_dir)
    model = getattr(transformers, hf_class).from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    # lmexp's own layout of each text ([CLS] ids [SEP] for bert, [eos] ids for gpt) is what the
    # exported tokenizer produces with its special tokens.
    texts = TEXTS[:4]
    ids = [run.tokenizer.encode([text])[0][:28] for text in texts]
    if name == "gpt":
        rows = [[run.tokenizer.eos_id, *row] for row in ids]
    else:
        cls, sep = run.tokenizer.special_id("[CLS]"), run.tokenizer.special_id("[SEP]")
        rows = [[cls, *row, sep] for row in ids]
        assert [tokenizer(text).input_ids for text in texts] == [
            [cls, *r, sep] for r in run.tokenizer.encode(texts)
        ]
    input_ids, mask = padded_batch(rows, run.tokenizer.pad_id)
    with torch.no_grad():
        ours = lmexp_logits(run.task, input_ids, mask)
        theirs = model(input_ids=input_ids, attention_mask=mask).logits
    if ours.dim() == 3:
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max() < 1e-4
    if name in ("classify", "ner"):
        assert list(model.config.id2label.values()) == run.labels


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt", "bert"])
def test_exported_tokenizer_gives_lmexp_ids(name, checkpoints, tmp_path, cache_dir):
    from transformers import AutoTokenizer

    out, run = exported(name, checkpoints, tmp_path, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        expected = run.tokenizer.encode([text])[0]
        assert tokenizer(text, add_special_tokens=False).input_ids == expected, text
        assert tokenizer.decode(expected) == run.tokenizer.decode(expected)
    assert any(run.tokenizer.id_to_piece(i).startswith("<0x") for i in run.tokenizer.encode([TEXTS[2]])[0])
    assert tokenizer.pad_token_id == run.tokenizer.pad_id and tokenizer.eos_token_id == run.tokenizer.eos_id


@pytest.mark.slow
def test_export_errors(checkpoints, tmp_path, cache_dir, monkeypatch):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    cfg = compose_tool("export", tmp_path, cache_dir, f"ckpt_path={checkpoints['gpt']}", f"out={taken}")
    with pytest.raises(ConfigError, match="exists and is not an empty directory"):
        export(cfg)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(ConfigError, match="export needs the transformers package"):
        export(compose_tool("export", tmp_path, cache_dir, f"ckpt_path={checkpoints['gpt']}", "out=x"))


def test_architectures_without_a_transformers_equivalent_are_named():
    from lmexp.models import bert_hf, gpt_hf
    from lmexp.models.bert import BERTConfig
    from lmexp.models.gpt import GPTConfig

    no_bias = GPTConfig(n_layer=1, n_head=2, n_embd=16, max_seq_len=8, vocab_size=70, bias=False)
    with pytest.raises(ConfigError, match="model.bias=false cannot be expressed as GPT2LMHeadModel"):
        gpt_hf.hf_config(no_bias, 70, {"eos_token_id": 3})
    with pytest.raises(ConfigError, match="model.norm_first=true .* cannot be expressed as a Hugging Face"):
        bert_hf.hf_config(BERTConfig(norm_first=True, vocab_size=70), 70, {"pad_token_id": 0})
