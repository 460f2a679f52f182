"""``python -m lmexp.eval ckpt_path=<.ckpt>``: evaluate a checkpoint on a test split, with predictions.

Writes into its run dir ``metrics.json`` (``test/...`` keys) and ``predictions.jsonl``:

- ``task=classify``: one row per example, ``{"text", "label", "pred"}``;
- ``task=ner``: one row per sentence, ``{"tokens", "tags", "pred"}`` with one predicted tag per word
  (``null`` for words past ``data.block_size`` sub-tokens, which are not predicted and not scored);
- ``task=qa``: one row per question, ``{"id", "question", "answers", "pred"}`` (``answers``: the gold
  texts, empty for an unanswerable one; ``pred`` "" = no answer); ``test/exact_match`` and ``test/f1`` are
  recomputed from these rows with the official SQuAD normalisation (:func:`qa_metrics`);
- ``task=sft``: one row per test example, ``{"prompt", "reference", "pred", "exact_match", "rougeL",
  "chrf", "bleu"}``: the completion generated greedily after the prompt (a chat's last assistant turn
  after the turns before it), scored with :func:`lmexp.tasks.generation_metrics.generation_metrics`;
- ``task=clm`` (gpt, llama, lstm): one row per document, ``{"n_tokens", "nll", "n_correct", "n_words",
  "n_bytes"}``. Each document of the test split (as tokenized by the data engine, lmexp/data/) is scored
  on its own from its start (``[eos] doc``, predicting every token and the closing eos, in windows of
  ``data.block_size``), so ``test/loss`` = sum of ``nll`` / sum of ``n_tokens`` and ``test/bpb`` = sum
  of ``nll`` / ln 2 / sum of ``n_bytes`` (the UTF-8 bytes of the document's text).

Every metric can be recomputed from predictions.jsonl (the qa loss aside). With ``harness.tasks=[...]``
(:class:`EvalHarnessConfig`) lm-evaluation-harness scores the checkpoint's causal LM, or a local Hugging
Face model, instead: ``harness/<task>/<metric>`` in metrics.json, no predictions. Data keys override the
checkpoint's, e.g. ``data.test_path=other.jsonl``. Heavy imports happen inside the functions, so ``--help``
is instant.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmexp.config.schema import Schema, at_least, positive
from lmexp.errors import ConfigError
from lmexp.inference.restore import RestoredRun, require, restore_run


@dataclass
class EvalHarnessConfig(Schema):
    """``harness`` in conf/eval.yaml: lm-evaluation-harness tasks instead of the test split."""

    tasks: list[str] | None = None
    """lm-eval task names (or those defined under include_path); null: score the test split instead."""
    include_path: str | None = None
    """A directory of task YAML files: local tasks over local data files."""
    limit: float | None = None
    """Examples per task (a fraction of each task when below 1); null: all."""
    num_fewshot: int | None = None
    """Few-shot examples in each prompt; null: each task's own setting."""
    batch_size: int = positive(8)
    """Sequences per forward pass."""
    max_length: int | None = None
    """The longest context in tokens; null: the checkpoint's data.block_size (or the HF model's)."""
    hf_model: str | None = None
    """A local Hugging Face causal LM directory to score instead of ckpt_path (e.g. an lmexp export)."""
    seed: int = at_least(0, 0)
    """Seed of few-shot sampling and of generation."""

    def problems(self) -> list[str]:
        if self.tasks is not None and not self.tasks:
            return ["harness.tasks=[]: expected task names, e.g. harness.tasks=[hellaswag], or null"]
        return []


def _data_overrides(cfg: DictConfig) -> dict[str, Any]:
    """The command line's non-null ``data.*`` values (they replace the checkpoint's)."""
    return {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if v is not None}


# ------------------------------------------------------------------------------------- labelled
def _test_datamodule(run: RestoredRun, cfg: DictConfig) -> Any:
    """The checkpoint's data module over its test split only, with the checkpoint's tokenizer and labels."""
    from lmexp.data.context import DataContext
    from lmexp.data.tokenizer_store import as_given

    data = run.group("data", **_data_overrides(cfg))
    if not data.test_path:
        raise ConfigError("data.test_path is not set: expected the file of examples to evaluate on")
    data.train_path = data.val_path = None
    context = DataContext(
        tokenizer=run.group("tokenizer"),
        cache_dir=Path(str(cfg.paths.cache_dir)).expanduser(),
        example_format=run.task.data_format,
        layout=run.layout,
        labels=run.labels,
        **as_given(run.tokenizer),
    )
    return data.build(context)


def _test_loop(run: RestoredRun, cfg: DictConfig, datamodule: Any) -> dict[str, float]:
    """The task's own test metrics over ``datamodule`` (Lightning's test loop, one device)."""
    import lightning.pytorch as pl

    from lmexp.training.run import quiet_lightning

    quiet_lightning()
    trainer = pl.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=cfg.trainer.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    results = trainer.test(run.task, datamodule=datamodule, verbose=False)[0]
    return {key: float(value) for key, value in results.items() if key.startswith("test/")}


def evaluate_labelled(run: RestoredRun, cfg: DictConfig) -> tuple[dict[str, float], list[dict]]:
    """Test metrics of a classify/ner checkpoint (Lightning test loop) and one prediction row per example."""
    datamodule = _test_datamodule(run, cfg)
    run.task.predictions = []
    metrics = _test_loop(run, cfg, datamodule)
    return dict(sorted(metrics.items())), _labelled_rows(run, datamodule)


def _labelled_rows(run: RestoredRun, datamodule: Any) -> list[dict]:
    labels = run.labels
    records = datamodule.records["test"]
    predicted = dict(run.task.predictions)
    rows = []
    for index, record in enumerate(records):
        if run.task.name == "classify":
            rows.append({"text": record.text, "label": record.label, "pred": labels[predicted[index]]})
        else:
            tags = [labels[i] for i in predicted[index]]
            pred = tags + [None] * (len(record.tokens) - len(tags))
            rows.append({"tokens": record.tokens, "tags": record.tags, "pred": pred})
    return rows


# ------------------------------------------------------------------------------------------- qa
def evaluate_qa(run: RestoredRun, cfg: DictConfig) -> tuple[dict[str, float], list[dict]]:
    """A qa checkpoint's answers to the test questions; exact match and F1 recomputed from the rows."""
    datamodule = _test_datamodule(run, cfg)
    loop = _test_loop(run, cfg, datamodule)
    examples, _ = datamodule.qa_split("test")
    predicted = run.task.predictions
    rows = [
        {
            "id": example.id,
            "question": example.question,
            "answers": list(example.gold_texts),
            "pred": predicted[example.id].text if example.id in predicted else "",
        }
        for example in examples
    ]
    return {"test/loss": loop["test/loss"], **qa_metrics(rows)}, rows


def qa_metrics(rows: list[dict]) -> dict[str, float]:
    """``test/exact_match`` and ``test/f1`` (fractions, official SQuAD) of predictions.jsonl rows."""
    from lmexp.tasks.squad_metrics import squad_scores

    scores = squad_scores({r["id"]: r["pred"] for r in rows}, {r["id"]: r["answers"] for r in rows})
    return {f"test/{name}": float(value) for name, value in sorted(scores.items())}


# ------------------------------------------------------------------------------------------- sft
def evaluate_sft(run: RestoredRun, cfg: DictConfig) -> tuple[dict[str, float], list[dict]]:
    """Greedy completions of an sft checkpoint for the test rows, scored against their references."""
    import torch

    from lmexp.data.sft import chat_prompt_ids
    from lmexp.inference.harness import Sampling, kv_cache_generate
    from lmexp.models.registry import context_length
    from lmexp.tasks.generation_metrics import generation_metrics

    datamodule = _test_datamodule(run, cfg)
    datamodule.prepare(pack=False)
    tokenizer, model = run.tokenizer, run.task.model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    generate = kv_cache_generate(model, tokenizer.vocab_size, tokenizer.eos_id)
    greedy = Sampling(temperature=0.0)
    context, _ = context_length(model)
    limit = min(datamodule.block_size, context or datamodule.block_size)
    max_new = int(cfg.generation.max_new_tokens)
    prompts, references, texts = [], [], []
    for record in datamodule.records["test"]:
        if record.messages is None:
            ids = [*datamodule.start_ids, *tokenizer.encode([record.prompt])[0]]
            prompt_text, reference = record.prompt, record.completion
        else:
            last = max(i for i, m in enumerate(record.messages) if m["role"] == "assistant")
            ids = chat_prompt_ids(record.messages[:last], tokenizer, datamodule.start_ids)
            prompt_text = record.messages[last - 1]["content"]
            reference = record.messages[last]["content"]
        ids = ids[-(limit - 1) :]  # the model sees at most its context; keep the prompt's end
        new = generate(ids, max(1, min(max_new, limit - len(ids))), greedy, lambda _: False)
        prompts.append(prompt_text)
        references.append(reference)
        texts.append(tokenizer.decode(new).strip())
    corpus, scores = generation_metrics(texts, references)
    rows = [
        {"prompt": p, "reference": r, "pred": t, **row}
        for p, r, t, row in zip(prompts, references, texts, scores, strict=True)
    ]
    return {f"test/{name}": value for name, value in sorted(corpus.items())}, rows


# ------------------------------------------------------------------------------------ language model
def evaluate_language_model(run: RestoredRun, cfg: DictConfig) -> tuple[dict[str, float], list[dict]]:
    """Per-document NLL of a causal LM on the test split, and the metrics summed from those rows."""
    import torch

    tokenizer, model = run.tokenizer, run.task.model
    overrides = {k: v for k, v in _data_overrides(cfg).items() if k != "test_path"}
    block_size = run.group("data", **overrides).block_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    rows = []
    for stream in _test_streams(run, cfg, overrides):
        for ids, n_bytes, n_words in stream_documents(stream, tokenizer.eos_id):
            window = torch.tensor([tokenizer.eos_id, *ids, tokenizer.eos_id], device=device)  # (n + 2,)
            nll, correct = _score_stream(model, window, block_size, tokenizer.vocab_size)
            rows.append(
                {
                    "n_tokens": len(ids) + 1,
                    "nll": nll,
                    "n_correct": correct,
                    "n_words": n_words,
                    "n_bytes": n_bytes,
                }
            )
    if not rows:
        raise ConfigError("the test split has no documents; set data.test_path=<file>")
    return language_model_metrics(rows), rows


def _test_streams(run: RestoredRun, cfg: DictConfig, overrides: dict[str, Any]) -> list[Any]:
    """The token streams of the test split: of ``data.test_path`` when given, else of the checkpoint's
    corpus, tokenized by the checkpoint's tokenizer (the training run's shards when they are cached)."""
    from lmexp.data.context import DataContext
    from lmexp.data.prepare import prepare_source
    from lmexp.data.sources import SourceSpec
    from lmexp.data.tokenizer_store import as_given

    cache_dir = Path(str(cfg.paths.cache_dir)).expanduser()
    data = run.group("data", **overrides)
    if cfg.data.get("test_path"):
        spec = SourceSpec(
            "test", cfg.data.test_path, data.format, data.text_field, assign_split="test", key="data",
            path_key="data.test_path",
        )  # fmt: skip
        return [prepare_source(spec, run.tokenizer.path, cache_dir, data.prepare_config()).stream("test")]
    context = DataContext(run.group("tokenizer"), cache_dir, **as_given(run.tokenizer))
    datamodule = data.build(context)
    datamodule.prepare()
    streams = [s.stream("test") for s in datamodule.corpus.sources.values() if "test" in s.splits]
    if not streams:
        raise ConfigError("the checkpoint's data has no test split; set data.test_path=<file>")
    return streams


def stream_documents(
    stream: Any, eos_id: int, chunk_tokens: int = 1 << 20
) -> Iterator[tuple[list[int], int, int]]:
    """Each document of a split's token stream (``[eos] doc [eos] doc ... [eos]``) as (token ids without
    eos, UTF-8 bytes, words of its text), read ``chunk_tokens`` at a time."""
    import numpy as np

    previous = None  # position of the eos that opens the next document
    for start in range(0, len(stream), chunk_tokens):
        for end in (start + np.flatnonzero(stream.read(start, start + chunk_tokens) == eos_id)).tolist():
            if previous is not None:
                _, n_bytes, n_words = stream.documents_between(end, end + 1)
                yield stream.read(previous + 1, end).tolist(), n_bytes, n_words
            previous = end


def _score_stream(model: Any, stream: Any, block_size: int, vocab_size: int) -> tuple[float, int]:
    """Summed NLL (nats) and correct argmax predictions of ``stream[1:]`` given what precedes it."""
    import torch
    import torch.nn.functional as F

    nll, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, block_size):
            window = stream[start : start + block_size + 1]  # (t + 1,): inputs and their next tokens
            logits = model(window[None, :-1])[0].float()  # (t, V')
            targets = window[1:]  # (t,)
            nll += float(F.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits[:, :vocab_size].argmax(dim=-1) == targets).sum())
    return nll, correct


def language_model_metrics(rows: list[dict]) -> dict[str, float]:
    """``test/loss``, ``ppl``, ``acc``, ``bpb`` and (where words mean something, lmexp.tasks.metrics)
    ``bpw`` from per-document rows (sums, then ratios)."""
    from lmexp.tasks.metrics import words_are_meaningful

    nll = sum(row["nll"] for row in rows)
    tokens = sum(row["n_tokens"] for row in rows)
    words = sum(row["n_words"] for row in rows)
    n_bytes = sum(row["n_bytes"] for row in rows)
    loss = nll / tokens
    metrics = {
        "test/loss": loss,
        "test/ppl": math.exp(loss),
        "test/acc": sum(row["n_correct"] for row in rows) / tokens,
        "test/tokens": float(tokens),
    }
    if n_bytes:
        metrics["test/bpb"] = nll / math.log(2) / n_bytes
    if words_are_meaningful(n_bytes, words):
        metrics["test/bpw"] = nll / math.log(2) / words
    return dict(sorted(metrics.items()))


# ------------------------------------------------------------------------------------------- main
# How each task's checkpoint is scored: test metrics and one predictions.jsonl row per example.
EVALUATORS = {
    "clm": evaluate_language_model,
    "classify": evaluate_labelled,
    "ner": evaluate_labelled,
    "qa": evaluate_qa,
    "sft": evaluate_sft,
}


def evaluate_harness(harness: EvalHarnessConfig, cfg: DictConfig) -> dict[str, float]:
    """``harness/<task>/<metric>`` of ``harness.hf_model`` (a local HF causal LM) or of the checkpoint's
    language model, through :meth:`lmexp.inference.harness.HarnessLM.from_lmexp` (no export needed)."""
    from lmexp.inference.harness import HarnessLM, run_harness, task_manager

    task_manager(harness.tasks, harness.include_path, "harness")  # an unknown task fails before any loading
    if harness.hf_model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = str(Path(harness.hf_model).expanduser())
        if not Path(path).is_dir():
            raise ConfigError(f"harness.hf_model={path}: expected a local Hugging Face model directory")
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        lm = HarnessLM.from_hf(model, tokenizer, harness.max_length, harness.batch_size)
    else:
        require(cfg, ckpt_path="a causal LM checkpoint (task=clm or sft), or harness.hf_model=<dir>")
        run = restore_run(cfg.ckpt_path, cfg.paths.cache_dir)
        if not run.task.language_model:
            raise ConfigError(
                f"ckpt_path={cfg.ckpt_path}: lm-evaluation-harness scores causal language models; this "
                f"checkpoint is task={run.task_name}"
            )
        block_size = run.group("data").block_size
        lm = HarnessLM.from_lmexp(
            run.task.model, run.tokenizer, harness.max_length or block_size, harness.batch_size
        )
    limit = harness.limit if harness.limit is None or harness.limit < 1 else int(harness.limit)
    return run_harness(lm, harness.tasks, harness.include_path, limit, harness.num_fewshot, harness.seed)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate ``cfg.ckpt_path``; write metrics.json and predictions.jsonl into the run dir."""
    from lmexp.cache import atomic_write_json, atomic_write_text
    from lmexp.config.schema import parse

    harness = parse(EvalHarnessConfig, cfg.get("harness") or {}, "harness")
    wandb_mode(cfg)  # a bad wandb.mode stops here, before any evaluation work
    if harness.tasks:
        metrics = evaluate_harness(harness, cfg)
        run_dir = Path(cfg.paths.run_dir)
        atomic_write_json(run_dir / "metrics.json", metrics)
        log_to_wandb(cfg, metrics, run_dir)
        for key, value in metrics.items():
            print(f"{key:<32} {value:.6g}")
        print(f"run dir: {run_dir}  (metrics.json)")
        return metrics
    require(cfg, ckpt_path="a checkpoint, e.g. ckpt_path=outputs/runs/<date>/<time>/checkpoints/last.ckpt")
    run = restore_run(cfg.ckpt_path, cfg.paths.cache_dir)
    evaluator = EVALUATORS.get(run.task_name)
    if evaluator is None:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: eval scores task={', '.join(EVALUATORS)} checkpoints; this one is "
            f"task={run.task_name} (export it to Hugging Face with python -m lmexp.export)"
        )
    metrics, rows = evaluator(run, cfg)
    run_dir = Path(cfg.paths.run_dir)
    atomic_write_json(run_dir / "metrics.json", metrics)
    atomic_write_text(run_dir / "predictions.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    log_to_wandb(cfg, metrics, run_dir)
    for key, value in metrics.items():
        print(f"{key:<24} {value:.6g}")
    print(f"run dir: {run_dir}  (metrics.json, predictions.jsonl: {len(rows)} rows)")
    return metrics


def wandb_mode(cfg: DictConfig) -> str | None:
    """``wandb.mode`` of the eval (auto, online or offline), None when off; a ConfigError when unknown."""
    mode = str((cfg.get("wandb") or {}).get("mode", "off"))
    if mode in ("off", "disabled", "None", "null", "False"):
        return None
    if mode not in ("auto", "online", "offline"):
        raise ConfigError(f"wandb.mode={mode!r}: expected auto, online, offline or off")
    return mode


def log_to_wandb(cfg: DictConfig, metrics: dict[str, float], run_dir: Path) -> str | None:
    """The eval's metrics as a W&B run of job type ``eval`` (``wandb.mode``: auto, online, offline or off;
    auto = online with credentials, else offline files in ``<run dir>/wandb``); returns its mode, or None."""
    from lmexp.training.loggers import resolve_wandb_mode

    options = cfg.get("wandb") or {}
    mode = wandb_mode(cfg)
    if mode is None:
        return None
    import wandb

    run = wandb.init(
        project=str(options.get("project") or "lmexp"),
        group=options.get("group"),
        job_type="eval",
        dir=str(run_dir),
        mode=resolve_wandb_mode(mode),
        config={"ckpt_path": cfg.get("ckpt_path"), "harness": dict(cfg.get("harness") or {})},
    )
    run.log(metrics)
    run.summary.update(metrics)
    run.finish()
    return mode
