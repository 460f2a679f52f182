"""BERT (masked LM + NSP) and the LSTM baseline through the same training path as GPT."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lmexp.train import train

BERT_KEYS = {"val/loss", "val/mlm_loss", "val/ppl", "val/acc", "val/nsp_acc", "val/nsp_f1", "test/loss"}
BERT_TINY = ["model=bert", "data.block_size=64", "data.batch_size=16"]


def train_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]


@pytest.mark.slow
def test_bert_pretraining_learns(config, tmp_path):
    run_dir = tmp_path / "run"
    metrics = train(config(*BERT_TINY, "trainer.max_steps=40", "trainer.val_check_interval=20"))
    assert BERT_KEYS <= set(metrics)
    assert metrics["val/loss"] == pytest.approx(metrics["val/mlm_loss"] + metrics["val/nsp_loss"], rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(2.718281828 ** metrics["val/mlm_loss"], rel=1e-4)
    losses = train_losses(run_dir)
    assert losses[-1] < losses[0] - 0.5
    assert json.loads((run_dir / "metrics.json").read_text()) == pytest.approx(metrics)

    # The checkpoint carries the tokenizer, which reserves BERT's special tokens.
    import torch

    from lmexp.data.tokenizer import Tokenizer

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    model_file = tmp_path / "spm.model"
    model_file.write_bytes(checkpoint["lmexp"]["tokenizer_model"].numpy().tobytes())
    tokenizer = Tokenizer.load(model_file)
    assert (tokenizer.id_to_piece(0), tokenizer.id_to_piece(1)) == ("[PAD]", "[UNK]")
    for piece in ("[CLS]", "[SEP]", "[MASK]"):
        assert tokenizer.encode([f"a {piece} b"])[0].count(tokenizer.special_id(piece)) == 1


@pytest.mark.slow
def test_bert_without_nsp(config):
    metrics = train(config(*BERT_TINY, "task.nsp=false", "trainer.max_steps=6"))
    assert "val/mlm_loss" in metrics and "val/nsp_acc" not in metrics
    assert metrics["val/loss"] == pytest.approx(metrics["val/mlm_loss"])


@pytest.mark.slow
def test_lstm_learns(config, tmp_path):
    metrics = train(config("model=lstm", "trainer.max_steps=40", "trainer.val_check_interval=20"))
    assert {"val/loss", "val/ppl", "val/acc", "val/bpw", "val/bpw_floor", "perf/tokens_per_sec"} <= set(
        metrics
    )
    losses = train_losses(tmp_path / "run")
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.slow
def test_bert_resume_matches_uninterrupted_run(config, tmp_path):
    from tests.conftest import CrashAtStep

    common = [*BERT_TINY, "trainer.max_steps=12", "callbacks.checkpoint.every_n_train_steps=4"]
    reference = train(config(*common, run_dir=tmp_path / "ref"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(*common, run_dir=tmp_path / "crashed"), extra_callbacks=[CrashAtStep(6)])
    last = tmp_path / "crashed" / "checkpoints" / "last.ckpt"
    resumed = train(config(*common, f"ckpt_path={last}", run_dir=tmp_path / "resumed"))
    assert resumed["val/loss"] == pytest.approx(reference["val/loss"], abs=1e-6)


@pytest.mark.slow
def test_bert_on_user_text(config, tmp_path):
    from lmexp.data.corpus import GrammarConfig, build_grammar, generate_documents

    docs = generate_documents(build_grammar(GrammarConfig()), 300, seed=5)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(docs) + "\n")
    metrics = train(config(*BERT_TINY, "data=text", f"data.path={corpus}", "trainer.max_steps=6"))
    assert BERT_KEYS <= set(metrics)
