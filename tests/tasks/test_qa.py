"""task=qa end to end: train from a pre-trained bert, lmexp.eval's predictions, export, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from lmexp.data.corpus import GrammarConfig, build_grammar
from lmexp.data.toy_tasks import qa_rows
from lmexp.inference.evaluate import qa_metrics
from lmexp.tasks.qa import WindowLogits
from tests.tasks.helpers import compose_tool, pretrained_checkpoint, write_jsonl

QA_TINY = [
    "task=qa",
    "model=bert",
    "data=squad",
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.max_steps=8",
    "trainer.val_check_interval=8",
    "scheduler.warmup_steps=2",
    "data.block_size=64",
    "data.stride=16",
    "data.max_question_len=16",
    "data.batch_size=16",
]


def test_squad_metrics_of_rows_by_hand():
    rows = [
        {"id": "a", "answers": ["The Cat"], "pred": "cat"},  # normalised: articles, case -> exact
        {"id": "b", "answers": ["red big dog", "dog"], "pred": "big dog"},  # best gold: f1 2/3 vs 2/3
        {"id": "c", "answers": [], "pred": ""},  # unanswerable, answered nothing: exact
        {"id": "d", "answers": ["x"], "pred": "y"},
    ]
    metrics = qa_metrics(rows)
    # b: vs "red big dog" p=2/2 r=2/3 f1=0.8; vs "dog" p=1/2 r=1 f1=2/3 -> 0.8
    assert metrics["test/exact_match"] == pytest.approx(2 / 4)
    assert metrics["test/f1"] == pytest.approx((1 + 0.8 + 1 + 0) / 4)


def test_window_logits_keep_each_window_once_in_index_order():
    metric = WindowLogits()
    logits = torch.arange(2 * 3 * 2, dtype=torch.float).reshape(2, 3, 2)  # (B, T, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    metric.update(torch.tensor([5, 2]), logits, mask)
    metric.update(torch.tensor([5]), logits[:1], mask[:1])  # DDP pads with a repeated window
    out = metric.compute()
    assert out["index"] == [2, 5]
    assert out["starts"][0].tolist() == [6.0, 8.0, 10.0] and out["ends"][1].tolist() == [1.0, 3.0]


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory, cache_dir):
    """A few-step qa fine-tuning of the tiny pre-trained bert (learning is not the point)."""
    from lmexp.train import train
    from tests.conftest import make_config

    root = tmp_path_factory.getbasetemp()
    bert = pretrained_checkpoint("bert", root / "pretrained", cache_dir)
    grammar = build_grammar(GrammarConfig())
    data = root / "qa-data"
    data.mkdir(exist_ok=True)
    paths = []
    for split, n, seed in (("train", 160, 1), ("val", 24, 2), ("test", 24, 3)):
        path = write_jsonl(data / f"squad-{split}.jsonl", qa_rows(grammar, n, seed))
        paths.append(f"data.{split}_path={path}")
    run_dir = root / "qa-run"
    train(make_config(run_dir, cache_dir, *QA_TINY, f"init_from={bert}", *paths, tiny=False))
    return run_dir


@pytest.mark.slow
def test_qa_trains_and_eval_recomputes_its_metrics(qa_run, cli, tmp_path):
    trained = json.loads((qa_run / "metrics.json").read_text())
    for key in ("val/exact_match", "val/f1", "test/exact_match", "test/f1", "val/loss"):
        assert 0 <= trained[key] <= (1 if "loss" not in key else 20), key

    result = cli("lmexp.eval", f"ckpt_path={qa_run}")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = next((tmp_path / "outputs" / "eval").glob("*/*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and set(rows[0]) == {"id", "question", "answers", "pred"}
    recomputed = qa_metrics(rows)
    for key in ("test/exact_match", "test/f1"):
        assert metrics[key] == pytest.approx(recomputed[key], abs=1e-9)
        assert metrics[key] == pytest.approx(trained[key], abs=1e-6)  # the same as the training run's test


@pytest.mark.slow
def test_qa_exports_to_bert_for_question_answering(qa_run, tmp_path, cache_dir):
    from lmexp.inference.export import export

    out = export(
        compose_tool("export", tmp_path / "x", cache_dir, f"ckpt_path={qa_run}", f"out={tmp_path / 'hf'}")
    )
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForQuestionAnswering"]  # parity was checked by export


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"answer_start": 3}, "line 2: answer 'noshum' does not match the context at answer_start 3"),
        ({"context": "The"}, "line 2: answer 'noshum' at answer_start"),
    ],
    ids=["answer_start", "short_context"],
)
def test_bad_squad_rows_are_one_line_from_the_cli(cli, tmp_path, change, message):
    good = {"id": "a", "question": "What?", "context": "The cat bifas the noshum.", "answers": {}}
    good["answers"] = {"text": ["noshum"], "answer_start": [18]}
    bad = {**good, "id": "b"}
    if "context" in change:
        bad["context"] = change["context"]
    else:
        bad["answers"] = {"text": ["noshum"], "answer_start": [change["answer_start"]]}
    path = write_jsonl(tmp_path / "train.jsonl", [good, bad])
    result = cli(
        "lmexp.train",
        "task=qa",
        "model=bert",
        "data=squad",
        f"data.train_path={path}",
        f"data.val_path={path}",
        forked=True,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: data.train_path: {path} line 2") and message in last, last
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_ddp_gathers_every_window_before_answering(qa_run, cli, tmp_path):
    """Two gloo ranks hold different windows of a question (and a padded repeat); the gathered val scores
    equal a single-process evaluation of the same final weights on the same questions."""
    data = qa_run.parent / "qa-data"
    val_path = data / "squad-val.jsonl"
    paths = [f"data.train_path={data / 'squad-train.jsonl'}", f"data.val_path={val_path}"]
    init = f"init_from={next((qa_run.parent / 'pretrained').glob('pretrained-bert'))}"
    run_dir = tmp_path / "ddp"
    steps = ["trainer.max_steps=2", "trainer.val_check_interval=2", "data.batch_size=7"]
    trained = cli(
        "lmexp.train", "trainer=ddp_cpu", *QA_TINY, *steps, init, *paths, f"hydra.run.dir={run_dir}"
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    ddp = json.loads((run_dir / "metrics.json").read_text())

    single = cli("lmexp.eval", f"ckpt_path={run_dir}", f"data.test_path={val_path}", "hydra.run.dir=eval")
    assert single.returncode == 0, single.stderr[-3000:]
    alone = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert ddp["val/exact_match"] == pytest.approx(alone["test/exact_match"], abs=1e-6)
    assert ddp["val/f1"] == pytest.approx(alone["test/f1"], abs=1e-6)
