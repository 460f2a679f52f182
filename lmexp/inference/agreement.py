"""A subject-verb agreement task for lm-evaluation-harness, drawn from the built-in corpus's grammar.

Each example is the start of a sentence, its subject noun phrase, and two continuations: the singular and
the plural form of one intransitive verb. The grammatical one agrees with the subject's head noun
("The dog" -> "runs", "The dogs" -> "run"). Half of the subjects carry a relative clause whose object has
the other number ("The dog that sees the cats" -> "runs"), an attractor a model that only looks at the
nearest noun gets wrong. Labels are balanced, so chance (and always preferring one form) scores 50%.

:func:`write_agreement_task` writes the examples as JSON lines plus an lm-eval task YAML that reads them
with the ``json`` loader, so ``run_harness(lm, ["lmexp_agreement"], include_path=directory)`` needs no
download.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml

from lmexp.cache import atomic_write_text
from lmexp.data.corpus import Grammar

TASK_NAME = "lmexp_agreement"


def agreement_examples(
    grammar: Grammar, n_examples: int, seed: int, attractor_prob: float = 0.5, top_words: int = 50
) -> list[dict[str, Any]]:
    """``n_examples`` rows ``{"context", "choices": [singular verb, plural verb], "label"}``, half singular.

    Nouns come from one topic at a time (a document's sentences share a topic); nouns and verbs are drawn
    from the ``top_words`` first of each list, which for nouns are the most frequent.
    """
    rng = random.Random(seed)
    rows = []
    for index in range(n_examples):
        singular = index % 2 == 0
        nouns = grammar.topic_nouns[rng.randrange(len(grammar.topic_nouns))][:top_words]
        words = ["the", rng.choice(nouns) + ("" if singular else "s")]
        if rng.random() < attractor_prob:
            verb = rng.choice(grammar.transitive_verbs[:top_words]) + ("s" if singular else "")
            words += ["that", verb, "the", rng.choice(nouns) + ("s" if singular else "")]  # the other number
        stem = rng.choice(grammar.intransitive_verbs[:top_words])
        context = Grammar.render_sentence(words)[:-1]  # capitalised like a sentence start, no period
        rows.append({"context": context, "choices": [stem + "s", stem], "label": 0 if singular else 1})
    return rows


def write_agreement_task(
    directory: str | Path,
    examples: list[dict[str, Any]],
    name: str = TASK_NAME,
    datasets_cache_dir: str | Path | None = None,
) -> Path:
    """Write ``<name>.jsonl`` and the task ``<name>.yaml`` (metrics ``acc``, ``acc_norm``) into ``directory``.

    ``datasets_cache_dir``: where ``datasets`` caches the parsed file (None = its default cache).
    Returns the YAML's path.
    """
    directory = Path(directory)
    data = directory / f"{name}.jsonl"
    atomic_write_text(data, "".join(json.dumps(row) + "\n" for row in examples))
    dataset_kwargs: dict[str, Any] = {"data_files": {"test": str(data.resolve())}}
    if datasets_cache_dir is not None:
        dataset_kwargs["cache_dir"] = str(datasets_cache_dir)
    task = {
        "task": name,
        "dataset_path": "json",  # datasets' local JSON loader: nothing is downloaded
        "dataset_kwargs": dataset_kwargs,
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    path = directory / f"{name}.yaml"
    atomic_write_text(path, yaml.safe_dump(task, sort_keys=False))
    return path
