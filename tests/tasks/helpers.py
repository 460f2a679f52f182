"""Labelled data with a learnable rule, and small pre-trained runs, shared by the fine-tuning tests.

Imported as ``tasks.helpers`` (``tests/`` is on ``sys.path``); the pre-trained runs are built once per
test session and reused by every module that asks for them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from omegaconf import DictConfig

# Topic words decide the label; fillers are shared, so a model must find the topic word.
TOPICS = {
    "animal": ["cat", "dog"],
    "vehicle": ["car", "bus"],
    "food": ["bread", "soup"],
}
FILLERS = ["the", "a", "big", "small", "old", "new", "red", "green", "was", "is", "near", "with", "very"]
PERSONS = [["alice"], ["bob"], ["carol", "smith"], ["dave", "jones"]]
PLACES = [["paris"], ["london"], ["new", "york"], ["rome"]]

PRETRAIN_TINY = [
    "debug=fast",
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "data.n_documents=300",
]
FINETUNE_TINY = [
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.max_steps=40",
    "trainer.val_check_interval=20",
    "trainer.log_every_n_steps=5",
    "scheduler.warmup_steps=4",
    "optim.lr=3e-3",
    "data.batch_size=16",
    "data.block_size=32",
    "optim.betas=[0.9,0.999]",  # beta2=0.95 (the pre-training default) leaves a tiny BERT stuck here
]


def classify_rows(n: int, seed: int) -> list[dict]:
    """Texts of fillers with one topic word; the label is the topic."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(TOPICS))
        words = rng.choices(FILLERS, k=rng.randint(2, 5))
        words.insert(rng.randint(0, len(words)), rng.choice(TOPICS[label]))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def ner_rows(n: int, seed: int) -> list[dict]:
    """Sentences of fillers with person and place names tagged in BIO."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(3, 7)):
            kind = rng.random()
            if kind < 0.2:
                name, entity = rng.choice(PERSONS), "PER"
            elif kind < 0.35:
                name, entity = rng.choice(PLACES), "LOC"
            else:
                tokens.append(rng.choice(FILLERS))
                tags.append("O")
                continue
            tokens.extend(name)
            tags.extend([f"B-{entity}"] + [f"I-{entity}"] * (len(name) - 1))
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_conll(path: Path, rows: list[dict]) -> Path:
    blocks = ["\n".join(f"{t} {g}" for t, g in zip(r["tokens"], r["tags"], strict=True)) for r in rows]
    path.write_text("-DOCSTART- O\n\n" + "\n\n".join(blocks) + "\n")
    return path


def labelled_splits(directory: Path, kind: str, sizes: tuple[int, int, int] = (400, 60, 60)) -> list[str]:
    """Train/val/test files of ``kind`` (classify or ner) as ``data.*_path`` overrides."""
    make = classify_rows if kind == "classify" else ner_rows
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n, seed in zip(("train", "val", "test"), sizes, (1, 2, 3), strict=True):
        paths.append(f"data.{split}_path={write_jsonl(directory / f'{kind}-{split}.jsonl', make(n, seed))}")
    return paths


_pretrained: dict[str, Path] = {}


def pretrained_checkpoint(model: str, root: Path, cache_dir: Path) -> Path:
    """``checkpoints/last.ckpt`` of a few-step pre-training run of ``model`` (built once per session)."""
    if model not in _pretrained:
        from lmexp.train import train
        from tests.conftest import make_config

        run_dir = root / f"pretrained-{model}"
        extra = ["data.block_size=64", "data.batch_size=16"] if model == "bert" else []
        cfg: DictConfig = make_config(
            run_dir, cache_dir, *PRETRAIN_TINY, f"model={model}", *extra, tiny=False
        )
        train(cfg)
        _pretrained[model] = run_dir / "checkpoints" / "last.ckpt"
    return _pretrained[model]


def compose_tool(name: str, run_dir: Path, cache_dir: Path, *overrides: str) -> DictConfig:
    """Compose ``conf/<name>.yaml`` (eval, generate, export) as its command would, into ``run_dir``."""
    from lmexp.config.compose import compose_job

    return compose_job([f"paths.cache_dir={cache_dir}", *overrides], run_dir, config_name=name)


def finetune(model_ckpt: Path | None, kind: str, root: Path, cache_dir: Path, *overrides: str) -> Path:
    """Fine-tune (``init_from=model_ckpt``) on generated ``kind`` data; return the run dir."""
    from lmexp.train import train
    from tests.conftest import make_config

    run_dir = root / f"finetune-{kind}-{len(list(root.glob('finetune-*')))}"
    init = [f"init_from={model_ckpt}"] if model_ckpt else []
    cfg = make_config(
        run_dir, cache_dir, *FINETUNE_TINY, f"task={kind}", "data=jsonl", *init,
        *labelled_splits(root / "data", kind), *overrides, tiny=False,
    )  # fmt: skip
    train(cfg)
    return run_dir
