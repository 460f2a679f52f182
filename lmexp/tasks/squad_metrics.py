"""Exact match and F1 of extractive QA, as the official SQuAD v1.1 / v2.0 evaluation defines them.

Both compare normalised answers: lower case, punctuation removed, the articles ``a``, ``an``, ``the``
removed as whole words, whitespace collapsed. Exact match is 1 when the normalised strings are equal;
F1 is the harmonic mean of the precision and recall of the normalised prediction's words against the
gold's (a bag of words: repeated words count as often as they occur in both). Each question scores the
maximum over its gold answers. A question with no gold answer (SQuAD v2 unanswerable, gold ``[]`` or
only answers that normalise to nothing) scores 1 on both only for a prediction that normalises to the
empty string, and 0 otherwise.

Scores here are FRACTIONS in [0, 1] (like every other lmexp metric, logged as ``val/exact_match`` and
``val/f1``); the SQuAD papers and leaderboards quote 100 times these numbers.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import torch
from torchmetrics import Metric

_PUNCTUATION = frozenset(string.punctuation)  # ASCII punctuation only, as in the official script
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised prediction equals the normalised gold answer, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Word-level F1 of the normalised prediction against the normalised gold answer.

    When either side normalises to no words, 1.0 if both do and 0.0 otherwise.
    """
    predicted_words = normalize_answer(prediction).split()
    gold_words = normalize_answer(gold).split()
    if not predicted_words or not gold_words:
        return float(predicted_words == gold_words)
    n_common = sum((Counter(predicted_words) & Counter(gold_words)).values())
    if n_common == 0:
        return 0.0
    precision = n_common / len(predicted_words)
    recall = n_common / len(gold_words)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(score: Callable[[str, str], float], prediction: str, golds: Sequence[str]) -> float:
    """The best ``score(prediction, gold)`` over the gold answers.

    Golds that normalise to nothing are dropped; a question left with none is unanswerable and is
    scored against the empty answer.
    """
    answerable = [gold for gold in golds if normalize_answer(gold)]
    return max(score(prediction, gold) for gold in answerable or [""])


def squad_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Mean exact match and F1 (fractions) over the questions of ``references`` (id -> gold answers).

    ``predictions`` maps a question id to its predicted answer (``""`` = no answer). As in the official
    evaluation, a question without a prediction scores 0 and predictions for unknown ids are ignored.
    """
    if not references:
        raise ValueError("squad_scores: no reference questions to score")
    total_em = total_f1 = 0.0
    for question_id, golds in references.items():
        if question_id not in predictions:
            continue
        total_em += best_over_golds(exact_match, predictions[question_id], golds)
        total_f1 += best_over_golds(f1, predictions[question_id], golds)
    return {"exact_match": total_em / len(references), "f1": total_f1 / len(references)}


class SquadMetric(Metric):
    """Mean SQuAD exact match and F1 (fractions) over the questions seen, summed across ranks.

    ``update(predictions, references)`` takes the predicted answer of each question (``""`` = no answer)
    and its gold answers (``[]`` for an unanswerable one); ``compute()`` returns
    ``{"exact_match": tensor, "f1": tensor}``. Each question must be scored once, on one rank.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("exact_match_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("f1_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("n_questions", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        if len(predictions) != len(references):
            raise ValueError(f"SquadMetric: {len(predictions)} predictions but {len(references)} references")
        self.exact_match_sum += sum(
            best_over_golds(exact_match, p, g) for p, g in zip(predictions, references, strict=True)
        )
        self.f1_sum += sum(best_over_golds(f1, p, g) for p, g in zip(predictions, references, strict=True))
        self.n_questions += len(predictions)

    def compute(self) -> dict[str, torch.Tensor]:
        n_questions = self.n_questions.clamp(min=1)  # no questions: 0, not NaN
        return {"exact_match": self.exact_match_sum / n_questions, "f1": self.f1_sum / n_questions}
