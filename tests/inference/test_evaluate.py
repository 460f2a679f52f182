"""lmexp.eval: metrics.json equals what predictions.jsonl recomputes, for classify, ner and causal LMs."""

from __future__ import annotations

import json
import math

import pytest
from seqeval.metrics import f1_score as seqeval_f1
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from lmexp.errors import ConfigError
from lmexp.inference.evaluate import evaluate
from tests.tasks.helpers import compose_tool, finetune, ner_rows, pretrained_checkpoint, write_jsonl


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """A few-step gpt classifier and bert tagger (learning is not the point), and the pre-trained runs."""
    root = tmp_path_factory.getbasetemp()
    gpt = pretrained_checkpoint("gpt", root / "pretrained", cache_dir)
    bert = pretrained_checkpoint("bert", root / "pretrained", cache_dir)
    short = ["trainer.max_steps=6", "trainer.val_check_interval=6"]
    classify = finetune(gpt, "classify", root / "eval-runs", cache_dir, *short)
    ner = finetune(bert, "ner", root / "eval-runs", cache_dir, *short)
    ckpt = "checkpoints/last.ckpt"
    return {"gpt": gpt, "bert": bert, "classify": classify / ckpt, "ner": ner / ckpt}


def read(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    return metrics, rows


@pytest.mark.slow
def test_classify_cli_metrics_equal_recomputation(runs, cli, tmp_path):
    from tests.tasks.helpers import classify_rows

    test_file = write_jsonl(tmp_path / "other-test.jsonl", classify_rows(37, seed=9))
    result = cli("lmexp.eval", f"ckpt_path={runs['classify']}", f"data.test_path={test_file}")
    assert result.returncode == 0, result.stderr
    run_dir = next((tmp_path / "outputs" / "eval").glob("*/*"))
    metrics, rows = read(run_dir)
    assert len(rows) == 37 and set(rows[0]) == {"text", "label", "pred"}
    assert [row["text"] for row in rows] == [row["text"] for row in classify_rows(37, seed=9)]
    true, pred = [row["label"] for row in rows], [row["pred"] for row in rows]
    assert metrics["test/acc"] == pytest.approx(accuracy_score(true, pred), abs=1e-6)
    for name, score in (("f1", f1_score), ("precision", precision_score), ("recall", recall_score)):
        assert metrics[f"test/{name}"] == pytest.approx(
            score(true, pred, average="macro", zero_division=0), abs=1e-6
        )
    labels = ["animal", "food", "vehicle"]
    per_label = f1_score(true, pred, labels=labels, average=None, zero_division=0)
    for label, value in zip(labels, per_label, strict=True):
        assert metrics[f"test/f1/{label}"] == pytest.approx(value, abs=1e-6)
    assert "test/f1" in result.stdout


@pytest.mark.slow
def test_ner_metrics_equal_recomputation(runs, tmp_path, cache_dir):
    rows = ner_rows(30, seed=4)
    rows[0] = {"tokens": ["alice"] * 40, "tags": ["B-PER"] * 40}  # longer than data.block_size: cut
    test_file = write_jsonl(tmp_path / "test.jsonl", rows)
    cfg = compose_tool(
        "eval", tmp_path / "eval", cache_dir, f"ckpt_path={runs['ner']}", f"data.test_path={test_file}"
    )
    evaluate(cfg)
    metrics, predictions = read(tmp_path / "eval")
    assert [p["tokens"] for p in predictions] == [r["tokens"] for r in rows]
    assert all(len(p["pred"]) == len(p["tokens"]) for p in predictions)
    assert predictions[0]["pred"][-1] is None  # words past data.block_size are not predicted
    scored = [
        [(t, p) for t, p in zip(row["tags"], row["pred"], strict=True) if p is not None]
        for row in predictions
    ]
    true = [[t for t, _ in sentence] for sentence in scored]
    pred = [[p for _, p in sentence] for sentence in scored]
    flat_true, flat_pred = sum(true, []), sum(pred, [])
    assert metrics["test/acc"] == pytest.approx(accuracy_score(flat_true, flat_pred), abs=1e-6)
    assert metrics["test/f1"] == pytest.approx(
        f1_score(flat_true, flat_pred, average="macro", zero_division=0), abs=1e-6
    )
    assert metrics["test/entity_f1"] == pytest.approx(seqeval_f1(true, pred, zero_division=0), abs=1e-6)


@pytest.mark.slow
def test_language_model_metrics_equal_recomputation(runs, tmp_path, cache_dir):
    cfg = compose_tool("eval", tmp_path / "eval", cache_dir, f"ckpt_path={runs['gpt']}")
    evaluate(cfg)
    metrics, rows = read(tmp_path / "eval")
    assert len(rows) > 5 and set(rows[0]) == {"n_tokens", "nll", "n_correct", "n_words", "n_bytes"}
    nll, tokens = sum(r["nll"] for r in rows), sum(r["n_tokens"] for r in rows)
    assert metrics["test/loss"] == pytest.approx(nll / tokens, rel=1e-9)
    assert metrics["test/ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-9)
    assert metrics["test/acc"] == pytest.approx(sum(r["n_correct"] for r in rows) / tokens, rel=1e-9)
    assert metrics["test/bpw"] == pytest.approx(nll / math.log(2) / sum(r["n_words"] for r in rows), rel=1e-9)
    assert metrics["test/bpb"] == pytest.approx(nll / math.log(2) / sum(r["n_bytes"] for r in rows), rel=1e-9)
    # The documents are the run's test split, each one scored on its own: close to the run's test loss.
    trained = json.loads((runs["gpt"].parent.parent / "metrics.json").read_text())
    assert metrics["test/loss"] == pytest.approx(trained["test/loss"], rel=0.05)


@pytest.mark.slow
def test_masked_lm_checkpoint_is_refused(runs, tmp_path, cache_dir):
    cfg = compose_tool("eval", tmp_path / "eval", cache_dir, f"ckpt_path={runs['bert']}")
    with pytest.raises(ConfigError, match="eval scores task=clm, classify, ner, qa, sft checkpoints"):
        evaluate(cfg)


# ------------------------------------------------------------------------------------------ harness
def _agreement_within(tokenizer, grammar, n: int, max_tokens: int) -> list[dict]:
    """Agreement examples whose context and longer choice fit ``max_tokens`` after the eos prefix."""
    from lmexp.inference.agreement import agreement_examples

    fitting = []
    for example in agreement_examples(grammar, 4 * n, seed=0):
        longest = max(len(tokenizer.encode([f"{example['context']} {c}"])[0]) for c in example["choices"])
        if longest + 1 <= max_tokens:
            fitting.append(example)
    return fitting[:n]


@pytest.mark.slow
def test_harness_on_a_checkpoint_from_the_cli_is_the_hand_computed_score(runs, cli, tmp_path, cache_dir):
    from lmexp.data.corpus import GrammarConfig, build_grammar
    from lmexp.inference.agreement import write_agreement_task
    from lmexp.inference.restore import restore_run
    from tests.inference.helpers import hand_loglikelihood

    run = restore_run(runs["gpt"], cache_dir)
    model, tokenizer = run.task.model, run.tokenizer
    examples = _agreement_within(tokenizer, build_grammar(GrammarConfig()), 8, run.group("data").block_size)
    tasks = tmp_path / "tasks"
    write_agreement_task(tasks, examples, datasets_cache_dir=tasks / "datasets")
    env = {"HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}
    harness = ["harness.tasks=[lmexp_agreement]", f"harness.include_path={tasks}"]
    result = cli("lmexp.eval", f"ckpt_path={runs['gpt']}", *harness, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(next((tmp_path / "outputs" / "eval").glob("*/*/metrics.json")).read_text())

    eos, correct = tokenizer.eos_id, 0
    for example in examples:
        context = [eos, *tokenizer.encode([example["context"]])[0]]
        scores = [
            hand_loglikelihood(model, context, [eos, *tokenizer.encode([f"{example['context']} {c}"])[0]])[0]
            for c in example["choices"]
        ]
        correct += max(range(2), key=scores.__getitem__) == example["label"]
    assert metrics["harness/lmexp_agreement/acc"] == pytest.approx(correct / len(examples))

    unknown = cli("lmexp.eval", f"ckpt_path={runs['gpt']}", "harness.tasks=[lmexp_agrement]", env=env)
    assert unknown.returncode != 0 and "Traceback" not in unknown.stderr
    last = unknown.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: harness.tasks: 'lmexp_agrement' is not an lm-eval task")
        and "close names" in last
    )


@pytest.mark.slow  # starts W&B's service
def test_eval_metrics_go_to_a_wandb_run_when_asked(tmp_path):
    from omegaconf import OmegaConf

    from lmexp.inference.evaluate import log_to_wandb
    from tests.conftest import wandb_records

    metrics = {"harness/agreement/acc": 0.5, "test/loss": 4.25}
    cfg = OmegaConf.create({"ckpt_path": "run/last.ckpt", "harness": {"tasks": ["agreement"]}})
    assert log_to_wandb(cfg, metrics, tmp_path) is None  # off unless asked: no run, no files
    assert not (tmp_path / "wandb").exists()
    cfg.wandb = {"mode": "offline", "project": "lmexp-test"}
    assert log_to_wandb(cfg, metrics, tmp_path) == "offline"
    (offline_run,) = (tmp_path / "wandb").glob("offline-run-*")
    summary = {}
    for record in wandb_records(offline_run):
        summary |= (record.get("summary") or {}).get("update", {})
    assert summary.get("harness/agreement/acc") == 0.5 and summary.get("test/loss") == 4.25
    cfg.wandb = {"mode": "sometimes"}
    with pytest.raises(ConfigError, match="wandb.mode='sometimes'"):
        log_to_wandb(cfg, metrics, tmp_path)
