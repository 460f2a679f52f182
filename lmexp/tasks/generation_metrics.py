"""Metrics of generated text against references: exact match, ROUGE-L, chrF and BLEU, per corpus and example.

All scores come from the reference implementations: BLEU and chrF from sacrebleu (corpus scores from the
pooled statistics, as sacrebleu reports them; per example, sentence scores with BLEU's effective order),
ROUGE-L from Google's rouge-score package (F-measure of the longest common subsequence; its tokenizer
lower-cases and keeps ASCII letters and digits only, so it needs no nltk data and no download). Exact match
compares texts after whitespace normalisation (runs of whitespace become one space, ends are stripped);
case and punctuation count.

Scales are each library's own: ``exact_match`` and ``rougeL`` in [0, 1], ``bleu`` and ``chrf`` in [0, 100].
With several references per prediction, exact match and ROUGE-L take the best reference, and BLEU and chrF
use them all, as multi-reference BLEU does.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmexp.errors import DataError

METRICS = ("exact_match", "rougeL", "chrf", "bleu")


def normalize_whitespace(text: str) -> str:
    """``text`` with runs of whitespace collapsed to one space and no leading or trailing whitespace."""
    return " ".join(text.split())


def _reference_lists(
    predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]
) -> list[list[str]]:
    """Each prediction's references as a list; DataError when the counts or the types do not fit."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise DataError("generation metrics: expected lists of texts, got a single string")
    if len(predictions) != len(references):
        raise DataError(
            f"generation metrics: {len(predictions)} predictions but {len(references)} references; "
            "expected one reference (or list of references) per prediction"
        )
    if not predictions:
        raise DataError("generation metrics: no predictions to score")
    lists = [[reference] if isinstance(reference, str) else list(reference) for reference in references]
    for index, (prediction, refs) in enumerate(zip(predictions, lists, strict=True)):
        if not isinstance(prediction, str):
            raise DataError(
                f"generation metrics: prediction {index} is {type(prediction).__name__}, not text"
            )
        if not refs or not all(isinstance(ref, str) for ref in refs):
            raise DataError(f"generation metrics: references of example {index}: expected one or more texts")
    return lists


def generation_metrics(
    predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Corpus-level metrics and one row of the same metrics per example, all plain floats.

    Args:
        predictions: one generated text per example.
        references: per example, one reference text or a list of them (the count may vary).

    Returns:
        ``({"exact_match", "rougeL", "chrf", "bleu"}, [{"exact_match", "rougeL", "chrf", "bleu"}, ...])``.
        Corpus ``exact_match`` and ``rougeL`` are means over the examples; corpus ``bleu`` and ``chrf`` are
        sacrebleu's corpus scores (not means of sentence scores).
    """
    from rouge_score.rouge_scorer import RougeScorer
    from sacrebleu.metrics import BLEU, CHRF

    predictions = list(predictions)
    reference_lists = _reference_lists(predictions, references)
    # sacrebleu takes references as streams (the k-th reference of every example); None fills a stream
    # for examples that have fewer references.
    n_streams = max(len(refs) for refs in reference_lists)
    streams = [[refs[k] if k < len(refs) else None for refs in reference_lists] for k in range(n_streams)]
    bleu, sentence_bleu, chrf = BLEU(), BLEU(effective_order=True), CHRF()
    rouge = RougeScorer(["rougeL"], use_stemmer=False)
    rows = []
    for prediction, refs in zip(predictions, reference_lists, strict=True):
        normalized = normalize_whitespace(prediction)
        rows.append(
            {
                "exact_match": float(any(normalized == normalize_whitespace(ref) for ref in refs)),
                "rougeL": float(rouge.score_multi(refs, prediction)["rougeL"].fmeasure),
                "chrf": float(chrf.sentence_score(prediction, refs).score),
                "bleu": float(sentence_bleu.sentence_score(prediction, refs).score),
            }
        )
    corpus = {
        "exact_match": sum(row["exact_match"] for row in rows) / len(rows),
        "rougeL": sum(row["rougeL"] for row in rows) / len(rows),
        "chrf": float(chrf.corpus_score(predictions, streams).score),
        "bleu": float(bleu.corpus_score(predictions, streams).score),
    }
    return corpus, rows
