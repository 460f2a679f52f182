"""``python -m lmexp.eval ckpt_path=<.ckpt>``: evaluate a checkpoint on a test split, with predictions.

Writes into its run dir ``metrics.json`` (``test/...`` keys) and ``predictions.jsonl``:

- ``task=classify``: one row per example, ``{"text", "label", "pred"}``;
- ``task=ner``: one row per sentence, ``{"tokens", "tags", "pred"}`` with one predicted tag per word
  (``null`` for words past ``data.block_size`` sub-tokens, which are not predicted and not scored);
- ``task=clm`` (gpt, lstm): one row per document, ``{"n_tokens", "nll", "n_correct", "n_words"}``. Each
  document is scored on its own from its start (``[eos] doc``, predicting every token and the closing
  eos, in windows of ``data.block_size``), so ``test/loss`` = sum of ``nll`` / sum of ``n_tokens``.

Every metric can be recomputed from predictions.jsonl. Data keys override the checkpoint's, e.g.
``data.test_path=other.jsonl``. Heavy imports happen inside the functions, so ``--help`` is instant.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lmexp.cli import config_dir, guarded, run_cli
from lmexp.errors import ConfigError


@dataclass
class RestoredRun:
    """A checkpoint turned back into its run: config, tokenizer, task (weights loaded, eval mode)."""

    path: Path
    config: DictConfig
    tokenizer: Any
    task: Any
    labels: list[str] | None

    @property
    def task_name(self) -> str:
        return self.task.task_name

    @property
    def model_family(self) -> str:
        """``gpt``, ``bert`` or ``lstm``, from the model config class."""
        return str(self.config.model._target_).rsplit(".", 1)[-1].removesuffix("Config").lower()


def restore_run(path: str | Path, cache_dir: str | Path, key: str = "ckpt_path") -> RestoredRun:
    """Rebuild the task of the checkpoint at ``path`` (its model, tokenizer and labels) for inference.

    ``path`` is a checkpoint, or a run dir (its ``checkpoints/last.ckpt``).
    """
    from lmexp.checkpoints import load_checkpoint
    from lmexp.data.labelled import cache_tokenizer_model
    from lmexp.data.tokenizer import Tokenizer

    if (Path(path) / "checkpoints").is_dir():  # a run dir stands for its last checkpoint
        path = Path(path) / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint(path, key=key)
    run = checkpoint["lmexp"]
    config = OmegaConf.create(run["config"])
    tokenizer = Tokenizer.load(
        cache_tokenizer_model(run["tokenizer_model"].numpy().tobytes(), Path(cache_dir))
    )
    model_config = hydra.utils.get_class(config.model._target_)(**run["model_config"])
    task_cls = hydra.utils.get_class(config.task._target_)
    kwargs = task_cls.builder_kwargs(tokenizer, config)
    if "labels" in run:
        kwargs["labels"] = list(run["labels"])
    task = hydra.utils.instantiate(
        config.task, model=model_config.build(), optimizer=None, vocab_size=tokenizer.vocab_size, **kwargs
    )
    task.load_state_dict(checkpoint["state_dict"])
    task.eval()
    return RestoredRun(Path(path), config, tokenizer, task, run.get("labels"))


def _data_config(run: RestoredRun, overrides: DictConfig) -> dict[str, Any]:
    """The checkpoint's data settings with the command line's non-null ``data.*`` values on top."""
    data = OmegaConf.to_container(run.config.data, resolve=True)
    data.update({k: v for k, v in OmegaConf.to_container(overrides, resolve=True).items() if v is not None})
    return data


# ------------------------------------------------------------------------------------- labelled
def evaluate_labelled(run: RestoredRun, cfg: DictConfig) -> tuple[dict[str, float], list[dict]]:
    """Test metrics of a classify/ner checkpoint (Lightning test loop) and one prediction row per example."""
    import lightning.pytorch as pl

    from lmexp.builders import quiet_lightning
    from lmexp.data.labelled import LabelledData

    quiet_lightning()
    data = _data_config(run, cfg.data)
    if not data.get("test_path"):
        raise ConfigError("data.test_path is not set: expected the labelled file to evaluate on")
    data.pop("_target_", None)
    data.update(train_path=None, val_path=None)
    datamodule = LabelledData(
        **data,
        cache_dir=cfg.paths.cache_dir,
        example_format=run.task.data_format,
        tokenizer_model=run.tokenizer.path.read_bytes(),
        layout="cls_sep" if run.model_family == "bert" else "eos",
        labels=run.labels,
    )
    trainer = pl.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=cfg.trainer.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    run.task.predictions = []
    results = trainer.test(run.task, datamodule=datamodule, verbose=False)[0]
    metrics = {key: float(value) for key, value in results.items() if key.startswith("test/")}
    return dict(sorted(metrics.items())), _labelled_rows(run, datamodule)


def _labelled_rows(run: RestoredRun, datamodule: Any) -> list[dict]:
    labels = run.labels
    records = datamodule.records["test"]
    predicted = dict(run.task.predictions)
    rows = []
    for index, record in enumerate(records):
        if run.task.data_format == "classify":
            rows.append({"text": record.text, "label": record.label, "pred": labels[predicted[index]]})
        else:
            tags = [labels[i] for i in predicted[index]]
            pred = tags + [None] * (len(record.tokens) - len(tags))
            rows.append({"tokens": record.tokens, "tags": record.tags, "pred": pred})
    return rows


# ------------------------------------------------------------------------------------ language model
def evaluate_language_model(run: RestoredRun, cfg: DictConfig) -> tuple[dict[str, float], list[dict]]:
    """Per-document NLL of a causal LM on the test split, and the metrics summed from those rows."""
    import torch

    documents = _test_documents(run, cfg)
    tokenizer, model = run.tokenizer, run.task.model
    block_size = int(_data_config(run, cfg.data)["block_size"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    rows = []
    for document, ids in zip(documents, tokenizer.encode(documents), strict=True):
        stream = torch.tensor([tokenizer.eos_id, *ids, tokenizer.eos_id], device=device)  # (n + 2,)
        nll, correct = _score_stream(model, stream, block_size, tokenizer.vocab_size)
        rows.append(
            {"n_tokens": len(ids) + 1, "nll": nll, "n_correct": correct, "n_words": len(document.split())}
        )
    return language_model_metrics(rows), rows


def _test_documents(run: RestoredRun, cfg: DictConfig) -> list[str]:
    from lmexp.data.text import read_documents, resolve_paths

    data = _data_config(run, cfg.data)
    if data.get("source") == "text" and cfg.data.get("test_path"):
        paths = resolve_paths(data["test_path"], "data.test_path")
        return read_documents(paths, "data.test_path", data.get("text_field", "text"))
    datamodule = hydra.utils.instantiate({**data, "cache_dir": cfg.paths.cache_dir}, _convert_="all")
    # The documents only: the checkpoint brings its own tokenizer, so none is trained or loaded here.
    documents, _ = datamodule._documents_by_split()
    if "test" not in documents:
        raise ConfigError("the checkpoint's data has no test split; set data.test_path=<file>")
    return documents["test"]


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
    """``test/loss``, ``ppl``, ``acc`` and ``bpw`` from per-document rows (sums, then ratios)."""
    nll = sum(row["nll"] for row in rows)
    tokens = sum(row["n_tokens"] for row in rows)
    words = sum(row["n_words"] for row in rows)
    loss = nll / tokens
    metrics = {
        "test/loss": loss,
        "test/ppl": math.exp(loss),
        "test/acc": sum(row["n_correct"] for row in rows) / tokens,
    }
    if words:
        metrics["test/bpw"] = nll / math.log(2) / words
    return dict(sorted(metrics.items()))


# ------------------------------------------------------------------------------------------- main
def require(cfg: DictConfig, **expected: str) -> None:
    """A ConfigError naming every required key (``???`` in the config) the command line left unset."""
    missing = [
        f"{key} is not set: expected {what}"
        for key, what in expected.items()
        if OmegaConf.is_missing(cfg, key)
    ]
    if missing:
        raise ConfigError(missing)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate ``cfg.ckpt_path``; write metrics.json and predictions.jsonl into the run dir."""
    from lmexp.cache import atomic_write_json, atomic_write_text

    require(cfg, ckpt_path="a checkpoint, e.g. ckpt_path=outputs/runs/<date>/<time>/checkpoints/last.ckpt")
    run = restore_run(cfg.ckpt_path, cfg.paths.cache_dir)
    if run.task_name in ("classify", "ner"):
        metrics, rows = evaluate_labelled(run, cfg)
    elif run.task_name == "clm":
        metrics, rows = evaluate_language_model(run, cfg)
    else:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: eval scores task=clm, classify and ner checkpoints; this one is "
            f"task={run.task_name} (export it to Hugging Face with python -m lmexp.export)"
        )
    run_dir = Path(cfg.paths.run_dir)
    atomic_write_json(run_dir / "metrics.json", metrics)
    atomic_write_text(run_dir / "predictions.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    for key, value in metrics.items():
        print(f"{key:<24} {value:.6g}")
    print(f"run dir: {run_dir}  (metrics.json, predictions.jsonl: {len(rows)} rows)")
    return metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
@guarded
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    run_cli(main)
