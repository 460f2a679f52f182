"""Extractive question answering (SQuAD v1.1 and v2.0): readers, windowed features, answers from logits.

Reading (:func:`read_squad`): SQuAD JSON files (``.json``: ``{"data": [{"paragraphs": [{"context",
"qas": [{"id", "question", "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}``) or JSON
lines in Hugging Face's ``squad`` layout (``.jsonl``: ``{"id", "context", "question", "answers":
{"text": [...], "answer_start": [...]}}``). A question without answers (or with ``is_impossible:
true``) is unanswerable (SQuAD v2). ``answer_start`` is a character offset into the context, and the
context must hold the answer text exactly there. Every problem is one :class:`~lmexp.errors.DataError`
naming the config key, the file and the line (JSON lines) or ``data[i].paragraphs[j].qas[k]`` (JSON).

Features (:func:`build_features`): each example becomes one or more windows laid out as ``[CLS]
question [SEP] context [SEP]`` with segment ids 0 for ``[CLS] question [SEP]`` and 1 for ``context
[SEP]`` (BERT's layout; the special ids are parameters). The question keeps its first
``max_question_len`` tokens; a context longer than the room left in ``max_len`` is cut into windows
that overlap by ``stride`` tokens. Every window knows its example and the character span of each of
its context tokens in the original context (from ``tokenizer.encode_with_offsets``, with leading
whitespace trimmed). Labels: ``start_position``/``end_position`` are the first and last tokens that
overlap the (first) gold answer when the whole answer lies inside the window; otherwise, and for
unanswerable questions, both are the null position 0 (the ``[CLS]`` token, as BERT does).

Answers (:func:`predict_answers`): per window, the ``n_best`` highest start and end logits over context
tokens (those with text) are paired into spans with end >= start and at most ``max_answer_len``
tokens, scored by start + end logit; the windows of an example are merged (the same character span
keeps its best score) and the best span wins. Its text is the original context between the first
token's start and the last token's end. With ``null_threshold`` set (SQuAD v2) the answer is empty when
the null score (start + end logit at position 0, the lowest over the example's windows, as BERT does)
exceeds the best span's score by more than ``null_threshold``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from lmexp.data.labelled import jsonl_rows, read_labelled_text
from lmexp.data.text_tokenizer import Span, TextTokenizer
from lmexp.errors import ConfigError, DataError

NULL_POSITION = 0  # start/end label of "no answer in this window": the first token, [CLS]
N_SPECIALS = 3  # [CLS] question [SEP] context [SEP]


# ------------------------------------------------------------------------------------------- examples
@dataclass(frozen=True)
class Answer:
    """A gold answer: its text and the character offset where it starts in the context."""

    text: str
    start: int

    @property
    def end(self) -> int:
        """Character offset just past the answer."""
        return self.start + len(self.text)


@dataclass
class QAExample:
    """One question about one context, with its gold answers (none: unanswerable)."""

    id: str
    """The question's id, unique in its file; predictions are keyed by it."""
    question: str
    context: str
    answers: list[Answer]
    """Gold answers; the first is the training target. Empty for an unanswerable question (v2)."""
    where: str = ""
    """Config key, file and line (or JSON path) of the question, for error messages."""

    @property
    def is_impossible(self) -> bool:
        """Whether the question has no answer in the context."""
        return not self.answers

    @property
    def gold_texts(self) -> list[str]:
        """The gold answer texts, as :mod:`lmexp.tasks.squad_metrics` takes them (``[]``: unanswerable)."""
        return [answer.text for answer in self.answers]


def read_squad(path: str | Path, key: str = "data.train_path") -> list[QAExample]:
    """The questions of a SQuAD ``.json`` file or a ``.jsonl`` file in Hugging Face's squad layout."""
    path = Path(path).expanduser()
    if path.suffix not in (".json", ".jsonl"):
        raise DataError(
            f"{key}: {path} has suffix {path.suffix!r}; expected .json (SQuAD) or .jsonl (a question a line)"
        )
    text = read_labelled_text(path, key)
    if path.suffix == ".jsonl":
        examples = [
            _jsonl_example(row, f"{key}: {path} line {line}") for line, row in jsonl_rows(text, path, key)
        ]
    else:
        examples = _squad_json_examples(text, path, key)
    if not examples:
        raise DataError(f"{key}: {path} has no questions; expected at least one")
    _check_unique_ids(examples, f"{key}: {path} ")
    return examples


def _squad_json_examples(text: str, path: Path, key: str) -> list[QAExample]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{key}: {path} line {err.lineno}: malformed JSON ({err.msg} at column {err.colno})"
        ) from None
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise DataError(f'{key}: {path}: expected a SQuAD JSON object {{"data": [articles]}}')
    examples = []
    for i, article in enumerate(document["data"]):
        for j, paragraph in enumerate(_typed(article, "paragraphs", list, f"{key}: {path} data[{i}]")):
            where = f"{key}: {path} data[{i}].paragraphs[{j}]"
            context = _typed(paragraph, "context", str, where)
            for k, qa in enumerate(_typed(paragraph, "qas", list, where)):
                where_qa = f"{where}.qas[{k}]"
                answers = []
                for a, answer in enumerate(_typed(qa, "answers", list, where_qa)):
                    where_answer = f"{where_qa}.answers[{a}]"
                    answers.append(
                        (
                            _typed(answer, "text", str, where_answer),
                            _field(answer, "answer_start", where_answer),
                        )
                    )
                examples.append(_example(qa, context, answers, where_qa))
    return examples


def _jsonl_example(row: dict, where: str) -> QAExample:
    context = _typed(row, "context", str, where)
    answers = _typed(row, "answers", dict, where)
    texts = _typed(answers, "text", list, f"{where}: answers")
    starts = _typed(answers, "answer_start", list, f"{where}: answers")
    if len(texts) != len(starts):
        raise DataError(
            f"{where}: answers has {len(texts)} texts but {len(starts)} answer_start values; expected as many"
        )
    return _example(row, context, list(zip(texts, starts, strict=True)), where)


def _example(qa: dict, context: str, answers: list[tuple[Any, Any]], where: str) -> QAExample:
    question_id = _field(qa, "id", where)
    if isinstance(question_id, bool) or not isinstance(question_id, (str, int)):
        raise DataError(f"{where}: field 'id' is {type(question_id).__name__}; expected a string")
    question = _typed(qa, "question", str, where)
    if not question.strip():
        raise DataError(f"{where}: the question is empty; expected text")
    if not context.strip():
        raise DataError(f"{where}: the context is empty; expected the text that holds the answer")
    impossible = qa.get("is_impossible", False)
    if not isinstance(impossible, bool):
        raise DataError(
            f"{where}: field 'is_impossible' is {type(impossible).__name__}; expected true or false"
        )
    if impossible and answers:
        raise DataError(f"{where}: is_impossible is true but it has {len(answers)} answers; expected none")
    checked = [_checked_answer(text, start, context, where) for text, start in answers]
    return QAExample(str(question_id), question, context, checked, where)


def _checked_answer(text: Any, start: Any, context: str, where: str) -> Answer:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: answer text {text!r} is empty or not a string; expected the answer's text")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise DataError(f"{where}: answer_start {start!r} of {text!r}: expected a character offset >= 0")
    if start + len(text) > len(context):
        raise DataError(
            f"{where}: answer {text!r} at answer_start {start} ends at character {start + len(text)}, "
            f"past the end of the context ({len(context)} characters)"
        )
    found = context[start : start + len(text)]
    if found != text:
        raise DataError(
            f"{where}: answer {text!r} does not match the context at answer_start {start}: {found!r}"
        )
    return Answer(text, start)


def _field(obj: Any, name: str, where: str) -> Any:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: is {type(obj).__name__}; expected a JSON object with field {name!r}")
    if name not in obj:
        raise DataError(f"{where}: has no field {name!r}")
    return obj[name]


_TYPE_NAMES = {str: "a string", list: "a list", dict: "a JSON object"}


def _typed(obj: Any, name: str, kind: type, where: str) -> Any:
    value = _field(obj, name, where)
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {name!r} is {type(value).__name__}; expected {_TYPE_NAMES[kind]}")
    return value


def _check_unique_ids(examples: list[QAExample], file_prefix: str) -> None:
    first_seen: dict[str, str] = {}
    for example in examples:
        if example.id in first_seen:
            raise DataError(f"{example.where}: id {example.id!r} is already used at {first_seen[example.id]}")
        first_seen[example.id] = example.where.removeprefix(file_prefix)


# ------------------------------------------------------------------------------------------- features
@dataclass(eq=False)  # arrays have no single truth value; features compare by identity
class QAFeature:
    """One window of an example: ``[CLS] question [SEP] context-window [SEP]`` and its labels.

    Arrays rather than lists: SQuAD's training set makes ~90k windows of 384 tokens.
    """

    example_index: int
    """Index of the example in the list given to :func:`build_features`."""
    example_id: str
    input_ids: np.ndarray
    """int64 (L,): the window's token ids, L <= max_len."""
    token_type_ids: np.ndarray
    """int64 (L,): 0 for ``[CLS] question [SEP]``, 1 for ``context [SEP]``."""
    offsets: np.ndarray
    """int64 (L, 2): character span in the context of each context token; (-1, -1) for question and
    special tokens."""
    start_position: int
    """Token index of the answer's first token in this window, or :data:`NULL_POSITION`."""
    end_position: int
    """Token index of the answer's last token in this window, or :data:`NULL_POSITION`."""

    @property
    def context_positions(self) -> np.ndarray:
        """Token indices of the window's context tokens (consecutive)."""
        return np.flatnonzero(self.offsets[:, 0] >= 0)


def window_problems(max_len: int, stride: int, max_question_len: int) -> list[str]:
    """Problems with the window settings, each naming its ``data.`` key (empty when they fit)."""
    problems = []
    for key, value, least in (
        ("max_len", max_len, 8),
        ("stride", stride, 0),
        ("max_question_len", max_question_len, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            problems.append(f"data.{key}={value!r}: expected an integer >= {least}")
    if not problems and max_len - N_SPECIALS - max_question_len <= stride:
        problems.append(
            f"data.max_len={max_len} leaves {max_len - N_SPECIALS - max_question_len} context tokens per "
            f"window after data.max_question_len={max_question_len} and 3 special tokens; expected more than "
            f"data.stride={stride}"
        )
    return problems


def build_features(
    examples: Sequence[QAExample],
    tokenizer: TextTokenizer,
    cls_id: int,
    sep_id: int,
    max_len: int = 384,
    stride: int = 128,
    max_question_len: int = 64,
) -> list[QAFeature]:
    """The windows of every example, in example order (see the module docstring for the layout).

    Args:
        examples: questions from :func:`read_squad`.
        tokenizer: any :class:`~lmexp.data.text_tokenizer.TextTokenizer`.
        cls_id, sep_id: the ids of ``[CLS]`` and ``[SEP]`` (a decoder-only model may pass e.g. eos).
        max_len: the most tokens per window, specials included.
        stride: tokens shared by consecutive windows of one context.
        max_question_len: the most question tokens kept (the rest is cut).
    """
    problems = window_problems(max_len, stride, max_question_len)
    if problems:
        raise ConfigError(problems)
    contexts = list(dict.fromkeys(example.context for example in examples))  # SQuAD repeats each context
    encoded = {}
    for context, (ids, spans) in zip(contexts, tokenizer.encode_with_offsets(contexts), strict=True):
        trimmed = np.array(trim_leading_whitespace(context, spans), dtype=np.int64).reshape(-1, 2)
        encoded[context] = (np.array(ids, dtype=np.int64), trimmed)
    questions = tokenizer.encode([example.question for example in examples])
    no_span = np.full((1, 2), -1, dtype=np.int64)
    features = []
    for index, (example, question_ids) in enumerate(zip(examples, questions, strict=True)):
        context_ids, spans = encoded[example.context]
        prefix = np.array([cls_id, *question_ids[:max_question_len], sep_id], dtype=np.int64)
        width = max_len - len(prefix) - 1
        answer = None if example.is_impossible else answer_token_range(spans, example.answers[0])
        for start in window_starts(len(context_ids), width, stride):
            stop = min(start + width, len(context_ids))
            positions = (NULL_POSITION, NULL_POSITION)
            if answer is not None and start <= answer[0] and answer[1] < stop:
                positions = (answer[0] - start + len(prefix), answer[1] - start + len(prefix))
            features.append(
                QAFeature(
                    example_index=index,
                    example_id=example.id,
                    input_ids=np.concatenate([prefix, context_ids[start:stop], [sep_id]]),
                    token_type_ids=np.repeat(np.array([0, 1]), [len(prefix), stop - start + 1]),
                    offsets=np.concatenate([no_span.repeat(len(prefix), 0), spans[start:stop], no_span]),
                    start_position=positions[0],
                    end_position=positions[1],
                )
            )
    return features


def window_starts(n_tokens: int, width: int, stride: int) -> list[int]:
    """First token of each window of ``width`` tokens over ``n_tokens``; consecutive ones share ``stride``."""
    starts = [0]
    while starts[-1] + width < n_tokens:
        starts.append(starts[-1] + width - stride)
    return starts


def trim_leading_whitespace(text: str, spans: Sequence[Span]) -> list[Span]:
    """Spans with the whitespace they begin with removed (sentencepiece's ``"▁"`` covers the space before a
    word), so that an answer's text runs from the first token's start without a leading space."""
    trimmed = []
    for start, end in spans:
        while start < end and text[start].isspace():
            start += 1
        trimmed.append((start, end))
    return trimmed


def answer_token_range(spans: np.ndarray, answer: Answer) -> tuple[int, int] | None:
    """First and last token whose (L, 2) span overlaps the answer's characters; None when no token does.

    An empty span (a leading byte piece of a character) counts when it lies strictly inside the answer.
    """
    inside = np.flatnonzero((spans[:, 0] < answer.end) & (spans[:, 1] > answer.start))
    return (int(inside[0]), int(inside[-1])) if len(inside) else None


class QAFeatureDataset(Dataset):
    """The features as a map-style dataset; items carry their ``index`` to match logits back to features."""

    def __init__(self, features: Sequence[QAFeature]) -> None:
        self.features = list(features)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        feature = self.features[index]
        return {
            "input_ids": feature.input_ids,
            "token_type_ids": feature.token_type_ids,
            "start_positions": feature.start_position,
            "end_positions": feature.end_position,
            "index": index,
        }


class QACollator:
    """Pads a batch of :class:`QAFeatureDataset` items on the right into tensors.

    Returns ``input_ids``, ``token_type_ids``, ``attention_mask`` (B, T) and ``start_positions``,
    ``end_positions``, ``index`` (B,).
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)  # (B, T)
        token_type_ids = torch.zeros((len(items), length), dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)  # (B, T)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.as_tensor(item["input_ids"])
            token_type_ids[row, :n] = torch.as_tensor(item["token_type_ids"])
            attention_mask[row, :n] = 1
        return {
            "input_ids": input_ids,
            "token_type_ids": token_type_ids,
            "attention_mask": attention_mask,
            "start_positions": torch.tensor([item["start_positions"] for item in items]),
            "end_positions": torch.tensor([item["end_positions"] for item in items]),
            "index": torch.tensor([item["index"] for item in items]),
        }


# -------------------------------------------------------------------------------------------- answers
class SpanCandidate(NamedTuple):
    """A candidate answer: the context substring between character offsets ``start`` and ``end``."""

    text: str
    score: float
    """Start logit of its first token plus end logit of its last token."""
    start: int
    end: int


@dataclass
class QAPrediction:
    """The answer to one question, with the scores that chose it."""

    text: str
    """The predicted answer; ``""`` means no answer."""
    score: float
    """Score of the best span (``-inf`` when no valid span exists)."""
    null_score: float
    """The lowest null score (start + end logit at position 0) over the example's windows."""
    n_best: list[SpanCandidate] = field(default_factory=list)
    """The best distinct spans, best first."""


def predict_answers(
    examples: Sequence[QAExample],
    features: Sequence[QAFeature],
    start_logits: Sequence[Any],
    end_logits: Sequence[Any],
    n_best: int = 20,
    max_answer_len: int = 30,
    null_threshold: float | None = None,
) -> dict[str, QAPrediction]:
    """The answer of every example that has features, keyed by example id.

    Args:
        examples, features: as given to and returned by :func:`build_features` (``features`` may be a
            subset, e.g. one rank's share, as long as ``start_logits[i]`` belongs to ``features[i]``).
        start_logits, end_logits: per feature, a 1-D array or tensor of at least ``len(input_ids)``
            logits (rows of a padded (N, T) array work too).
        n_best: how many start and end positions per window are paired, and spans kept per example.
        max_answer_len: the most tokens in an answer.
        null_threshold: None for SQuAD v1.1 (always answer when a span exists); a number for v2: answer
            ``""`` when ``null_score - best span score > null_threshold``.
    """
    if len(features) != len(start_logits) or len(features) != len(end_logits):
        raise ValueError(
            f"predict_answers: {len(features)} features but {len(start_logits)} start and "
            f"{len(end_logits)} end logit rows"
        )
    start_logits, end_logits = _as_rows(start_logits), _as_rows(end_logits)
    candidates: dict[int, dict[Span, float]] = {}
    null_scores: dict[int, float] = {}
    for feature, start_row, end_row in zip(features, start_logits, end_logits, strict=True):
        starts = np.asarray(start_row, dtype=np.float32)[: len(feature.input_ids)]
        ends = np.asarray(end_row, dtype=np.float32)[: len(feature.input_ids)]
        index = feature.example_index
        null_score = float(starts[NULL_POSITION] + ends[NULL_POSITION])
        null_scores[index] = min(null_scores.get(index, np.inf), null_score)
        merged = candidates.setdefault(index, {})
        for span, score in _window_spans(feature, starts, ends, n_best, max_answer_len):
            if score > merged.get(span, -np.inf):
                merged[span] = score
    predictions = {}
    for index, spans in candidates.items():
        context = examples[index].context
        ranked = sorted(spans.items(), key=lambda item: -item[1])[:n_best]
        n_best_spans = [SpanCandidate(context[a:b], score, a, b) for (a, b), score in ranked]
        best_score = n_best_spans[0].score if n_best_spans else -np.inf
        answer = n_best_spans[0].text if n_best_spans else ""
        if null_threshold is not None and null_scores[index] - best_score > null_threshold:
            answer = ""
        predictions[examples[index].id] = QAPrediction(answer, best_score, null_scores[index], n_best_spans)
    return predictions


def _as_rows(logits: Any) -> Any:
    """Logits as numpy rows: a tensor is moved to the CPU once (bf16 has no numpy dtype)."""
    if isinstance(logits, torch.Tensor):
        return logits.detach().float().cpu().numpy()
    return [row.detach().float().cpu().numpy() if isinstance(row, torch.Tensor) else row for row in logits]


def _window_spans(
    feature: QAFeature, starts: np.ndarray, ends: np.ndarray, n_best: int, max_answer_len: int
) -> list[tuple[Span, float]]:
    """The ``n_best`` best valid, distinct (character span, score) pairs of one window.

    Keeping only a window's ``n_best`` loses nothing: a span outside them is beaten by ``n_best``
    other spans of the same window, which stay candidates of the example. Tokens with an empty span
    (leading byte pieces, a lone word-start piece) neither start nor end a span: the span from the
    next token has the same text, without leading whitespace.
    """
    offsets = feature.offsets
    context = np.flatnonzero(offsets[:, 1] > offsets[:, 0])  # context tokens with text (others are -1, -1)
    if len(context) == 0:
        return []
    best_starts = context[np.argsort(-starts[context], kind="stable")[:n_best]]  # (S,)
    best_ends = context[np.argsort(-ends[context], kind="stable")[:n_best]]  # (E,)
    first, last = best_starts[:, None], best_ends[None, :]  # (S, 1), (1, E)
    valid = (last >= first) & (last - first < max_answer_len)  # (S, E)
    scores = starts[best_starts][:, None] + ends[best_ends][None, :]  # (S, E)
    rows, cols = np.nonzero(valid)
    order = np.argsort(-scores[rows, cols], kind="stable")
    rows, cols = rows[order], cols[order]
    char_starts = offsets[best_starts[rows], 0]
    char_ends = offsets[best_ends[cols], 1]
    # distinct character spans (tokens can share one, e.g. the byte pieces of a character), best first
    _, first_seen = np.unique(
        char_starts * (int(char_ends.max(initial=0)) + 1) + char_ends, return_index=True
    )
    keep = np.sort(first_seen)[:n_best]
    return [
        ((a, b), score)
        for a, b, score in zip(
            char_starts[keep].tolist(),
            char_ends[keep].tolist(),
            scores[rows[keep], cols[keep]].tolist(),
            strict=True,
        )
    ]
