"""model=hf for task=qa (encoders) and task=sft (decoders): tiny transformers models saved to tmp dirs.

Fast tests build the tasks around the saved models directly; slow ones train on the toy data sets
(lmexp/data/toy_tasks.py), evaluate and export through the real commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import default_collate

from lmexp.data.sft import RenderedExample, pack_examples
from lmexp.models.hf import HFModelConfig
from lmexp.tasks.base import TaskInputs
from lmexp.tasks.metrics import IGNORE_INDEX
from lmexp.tasks.qa import SpanExtractor
from lmexp.tasks.sft import SFTConfig, SFTTask
from tests.models.hf_helpers import DECODERS, byte_level_tokenizer, save_tiny_model, wordpiece_tokenizer

PAD = 0


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # every model comes from a local directory


def hf_model(directory: Path, attention: str | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    return HFModelConfig(name_or_path=str(directory), vocab_size=384, attn_implementation=attention).build()


def eos_of(directory: Path) -> int:
    return int(json.loads((directory / "config.json").read_text())["eos_token_id"])


def example(eos: int, prompt: list[int], completion: list[int]) -> RenderedExample:
    """``[eos] prompt completion [eos]``, learned on the completion and its eos, as render_examples does."""
    learned = [*completion, eos]
    return RenderedExample([eos, *prompt, *learned], [IGNORE_INDEX] * (1 + len(prompt)) + learned)


def batch_of(*examples: RenderedExample, block_size: int = 32) -> dict[str, torch.Tensor]:
    blocks = pack_examples(list(examples), block_size, PAD)
    return default_collate([blocks[i] for i in range(len(blocks))])


def sft_task(directory: Path) -> SFTTask:
    inputs = TaskInputs(SimpleNamespace(vocab_size=384))
    return SFTTask.build(SFTConfig(), hf_model(directory), inputs).eval()


# ---------------------------------------------------------------------------------- the model checks
def test_each_task_asks_for_its_kind_of_model(hf_model_dir):
    encoder, decoder = hf_model_dir("bert"), hf_model_dir("gpt2")
    assert HFModelConfig(name_or_path=str(encoder)).task_problems("qa") == []
    assert HFModelConfig(name_or_path=str(decoder)).task_problems("sft") == []
    (sft,) = HFModelConfig(name_or_path=str(encoder)).task_problems("sft")
    assert f"model.name_or_path={encoder} is an encoder: task=sft needs a decoder" in sft
    (qa,) = HFModelConfig(name_or_path=str(decoder)).task_problems("qa")
    assert f"model.name_or_path={decoder} is a decoder: task=qa needs an encoder" in qa


# ------------------------------------------------------------------------------------------------ sft
@pytest.mark.parametrize(("family", "attention"), [*((f, None) for f in DECODERS), ("llama", "eager")])
def test_packed_documents_never_see_each_other(family, attention, hf_model_dir):
    """A document's logits are those it gets alone, whatever the other documents of its block hold (sdpa,
    transformers' default here, and eager attention both take the 4-D mask)."""
    directory = hf_model_dir(family)
    model, eos = hf_model(directory, attention).eval(), eos_of(directory)
    first, second = [eos, 5, 6, 7, 8], [eos, 9, 10, 11]
    changed = [eos, 12, 13, 14, 15]
    documents = torch.tensor([[0] * 5 + [1] * 4])  # (1, 9)
    with torch.no_grad():
        together = model(torch.tensor([first + second]), document_ids=documents)  # (1, 9, V)
        other = model(torch.tensor([changed + second]), document_ids=documents)
        alone = model(torch.tensor([second]))  # (1, 4, V)
        unmasked = model(torch.tensor([first + second]))
    torch.testing.assert_close(together[:, 5:], other[:, 5:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[:, 5:], alone, atol=1e-5, rtol=1e-5)
    assert (together[:, 5:] - unmasked[:, 5:]).abs().max() > 1e-3  # without the mask they would differ


@pytest.mark.parametrize("family", DECODERS)
def test_loss_covers_completion_tokens_only(family, hf_model_dir):
    """The summed loss of a packed block is the completion tokens' NLL, each example scored on its own."""
    directory = hf_model_dir(family)
    task, eos = sft_task(directory), eos_of(directory)
    first, second = example(eos, [5, 6, 7], [8, 9]), example(eos, [10, 11], [12, 13, 14])
    together = batch_of(first, second)
    labels = together["labels"]
    assert (labels[0, :3] == IGNORE_INDEX).all() and labels[0, 3:6].tolist() == [8, 9, eos]
    with torch.no_grad():
        nll_sum, _, n_targets = task._nll(together)
        logits = task.model(together["input_ids"], document_ids=together["document_ids"])  # (1, T, V)
    assert int(n_targets) == 3 + 4  # two completions with their eos
    by_hand = torch.nn.functional.cross_entropy(
        logits[0, :, :384], labels[0], ignore_index=IGNORE_INDEX, reduction="sum"
    )
    assert float(nll_sum) == pytest.approx(float(by_hand), rel=1e-4)
    with torch.no_grad():
        alone = sum(float(task._nll(batch_of(e))[0]) for e in (first, second))
    assert float(nll_sum) == pytest.approx(alone, rel=1e-4)


# ------------------------------------------------------------------------------------------------- qa
def test_span_head_reads_segments_of_an_encoder(hf_model_dir):
    extractor = SpanExtractor(hf_model(hf_model_dir("bert"))).eval()
    assert extractor.segments  # BERT has two segments: question and context
    ids, mask = torch.tensor([[2, 20, 21, 3, 22, 23, 3]]), torch.ones(1, 7, dtype=torch.long)
    segments = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        plain, with_segments = extractor(ids, mask), extractor(ids, mask, segments)
    assert plain.shape == (1, 7, 2) and (plain - with_segments).abs().max() > 1e-4


def test_qa_export_is_the_model_types_question_answering_class_or_one_line(hf_model_dir):
    from omegaconf import OmegaConf
    from transformers import EsmConfig, EsmForMaskedLM

    from lmexp.errors import ConfigError
    from lmexp.inference.export import question_answering_model

    cfg = OmegaConf.create({"ckpt_path": "run/last.ckpt"})
    extractor = SpanExtractor(hf_model(hf_model_dir("bert"))).eval()
    exported = question_answering_model(extractor, cfg)
    assert type(exported).__name__ == "BertForQuestionAnswering"
    ids, mask = torch.tensor([[2, 20, 21, 3, 22, 23, 3]]), torch.ones(1, 7, dtype=torch.long)
    with torch.no_grad():
        output = exported(input_ids=ids, attention_mask=mask)
        theirs = torch.stack([output.start_logits, output.end_logits], dim=-1)  # (1, 7, 2)
        torch.testing.assert_close(theirs, extractor(ids, mask), atol=1e-5, rtol=1e-5)
    # ESM has a masked-LM class but no question-answering one in transformers
    esm = EsmConfig(
        vocab_size=33, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    fake = SimpleNamespace(backbone=SimpleNamespace(hf=EsmForMaskedLM(esm)), classifier=extractor.classifier)
    with pytest.raises(
        ConfigError, match=r"^ckpt_path=run/last.ckpt: transformers has no question-answering "
    ):
        question_answering_model(fake, cfg)


# ------------------------------------------------------------------------------------------- end to end
RUN_TINY = [
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "scheduler.warmup_steps=1",
    "data.batch_size=8",
    "optim.betas=[0.9,0.999]",
]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    from lmexp.data.toy_tasks import write_toy_tasks

    directory = tmp_path_factory.mktemp("toy")
    write_toy_tasks(directory, sizes={"train": 48, "val": 8, "test": 8})
    return directory


def splits(toy: Path, name: str) -> list[str]:
    return [f"data.{split}_path={toy / f'{name}-{split}.jsonl'}" for split in ("train", "val", "test")]


def toy_texts(toy: Path, name: str) -> tuple[str, ...]:
    """The questions, contexts and chat turns of a toy file's train rows."""
    rows = [json.loads(line) for line in (toy / f"{name}-train.jsonl").read_text().splitlines()]
    return tuple(
        text
        for row in rows
        for text in [
            row.get("question"),
            row.get("context"),
            *(m["content"] for m in row.get("messages", [])),
        ]
        if text
    )


@pytest.fixture(scope="module")
def toy_bert(tmp_path_factory, toy_data) -> Path:
    """A tiny BERT whose WordPiece tokenizer also saw the toy questions (the corpus has no "?")."""
    tokenizer = wordpiece_tokenizer(extra_texts=toy_texts(toy_data, "squad"))
    return save_tiny_model(tmp_path_factory.mktemp("toy-bert"), "bert", tokenizer=tokenizer)


def test_the_tokenizers_know_every_word_of_the_toy_data(toy_data):
    squad = toy_texts(toy_data, "squad")
    plain = wordpiece_tokenizer()
    assert {t for text in squad for t in plain.tokenize(text) if t == plain.unk_token} == {"[UNK]"}  # "?"
    tokenizer = wordpiece_tokenizer(extra_texts=squad)
    assert not [text for text in squad if tokenizer.unk_token in tokenizer.tokenize(text)]
    chats = toy_texts(toy_data, "translate")
    decoder = byte_level_tokenizer()  # bytes: nothing is unknown, every text comes back whole
    assert all(decoder.decode(decoder(text)["input_ids"]) == text for text in chats)


@pytest.mark.slow
def test_qa_trains_evaluates_and_exports(toy_bert, toy_data, cli, tmp_path):
    from transformers import AutoModelForQuestionAnswering

    run = tmp_path / "qa"
    trained = cli(
        "lmexp.train", "task=qa", "data=squad", "model=hf", f"model.name_or_path={toy_bert}",
        *RUN_TINY, "data.block_size=64", "data.stride=16", "data.max_question_len=16",
        *splits(toy_data, "squad"), f"hydra.run.dir={run}", env={"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val/exact_match", "val/f1", "test/f1"} <= set(metrics)
    scored = cli("lmexp.eval", f"ckpt_path={run}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert len((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()) == 8
    out = tmp_path / "exported"
    exported = cli("lmexp.export", f"ckpt_path={run}", f"out={out}")  # parity is checked on the way
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "BertForQuestionAnswering" in exported.stdout
    assert type(AutoModelForQuestionAnswering.from_pretrained(out)).__name__ == "BertForQuestionAnswering"


@pytest.mark.slow
def test_sft_trains_and_eval_generates_completions(hf_model_dir, toy_data, cli, tmp_path):
    run = tmp_path / "sft"
    trained = cli(
        "lmexp.train", "task=sft", "data=sft", "model=hf", f"model.name_or_path={hf_model_dir('qwen2')}",
        *RUN_TINY, "data.block_size=128", *splits(toy_data, "translate"), f"hydra.run.dir={run}",
        env={"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert {"val/loss", "test/loss"} <= set(json.loads((run / "metrics.json").read_text()))
    evaluated = tmp_path / "eval"
    scored = cli(
        "lmexp.eval", f"ckpt_path={run}", "generation.max_new_tokens=8", f"hydra.run.dir={evaluated}",
        env={"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-3000:]
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert {"test/exact_match", "test/rougeL", "test/chrf", "test/bleu"} <= set(metrics)
    rows = [json.loads(line) for line in (evaluated / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all({"prompt", "reference", "pred"} <= set(row) for row in rows)
    exported = cli("lmexp.export", f"ckpt_path={run}", f"out={tmp_path / 'exported'}")
    assert exported.returncode == 0 and "Qwen2ForCausalLM" in exported.stdout, exported.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "task", "data", "culprit"),
    [
        ("gpt2", "qa", "squad", "task=qa needs an encoder"),
        ("bert", "sft", "translate", "task=sft needs a decoder"),
    ],
)
def test_wrong_direction_is_one_line(family, task, data, culprit, hf_model_dir, toy_data, cli, tmp_path):
    data_group = "squad" if task == "qa" else "sft"
    result = cli(
        "lmexp.train", f"task={task}", f"data={data_group}", "model=hf",
        f"model.name_or_path={hf_model_dir(family)}", *RUN_TINY, *splits(toy_data, data),
        env={"HF_HUB_OFFLINE": "1"}, timeout=180,
    )  # fmt: skip
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], result.stderr[-3000:]
    assert not list(tmp_path.rglob("*.ckpt"))
