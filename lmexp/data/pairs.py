"""Sentence-pair examples for BERT: ``[CLS] A [SEP] B [SEP]`` with next-sentence-prediction labels.

Each document is walked from start to end, so nearly all of its text lands in some example once. A is a
run of consecutive segments (sentences) filling about half of the token budget; B is either the run that
follows A in the same document (``nsp_label`` 0, IsNext, the HuggingFace convention) or, with probability
``nsp_prob``, a run from a different document (``nsp_label`` 1, NotNext). When B is taken from elsewhere
the document's own next run is not consumed: it starts the next example instead, as in BERT's data
creation. Without NSP, examples are single runs ``[CLS] A [SEP]`` of up to ``max_len - 2`` tokens.

Sentences longer than one side's budget are cut into consecutive pieces, so no text is lost to
truncation; every run fits its budget by construction and no example exceeds ``max_len``.
"""

from __future__ import annotations

import bisect
import itertools
import re
from dataclasses import dataclass

import numpy as np
import torch

from lmexp.data.packing import token_dtype
from lmexp.errors import ConfigError, DataError

MIN_PAIR_LEN = 8
NOT_FROM_DOCUMENT = -1  # doc_b of examples without a B segment
IS_NEXT, NOT_NEXT = 0, 1
_PROVENANCE = ("doc_a", "a_start", "a_end", "doc_b", "b_start", "b_end")

# A run of sentence-final punctuation, optionally closed by quotes or brackets, followed by whitespace.
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s)")


def split_sentences(document: str) -> list[str]:
    """Split ``document`` into sentences at newlines and after ``.``, ``!`` or ``?`` followed by whitespace.

    The punctuation (and closing quotes or brackets after it) stays with its sentence; blank pieces are
    dropped. Abbreviations such as ``"e.g. this"`` are split too, which only shortens a segment.
    """
    sentences: list[str] = []
    for line in document.splitlines():
        start = 0
        for match in _SENTENCE_END.finditer(line):
            sentences.append(line[start : match.end()])
            start = match.end()
        sentences.append(line[start:])
    return [sentence.strip() for sentence in sentences if sentence.strip()]


@dataclass(frozen=True)
class PairSpecials:
    """Ids of the special tokens an example is framed with."""

    cls_id: int
    sep_id: int
    pad_id: int


@dataclass(eq=False)  # element-wise array comparison has no single truth value
class PairExamples(torch.utils.data.Dataset):
    """Sentence-pair examples stored as compact numpy arrays; items are dicts of int64 tensors.

    Provenance: example ``i`` has A = segments ``a_start[i]:a_end[i]`` of document ``doc_a[i]`` and B =
    segments ``b_start[i]:b_end[i]`` of ``doc_b[i]`` (``-1``, with an empty range, without NSP). Document
    indices index the ``documents`` given to :func:`build_pair_examples`; segment indices index that
    document's non-empty sentences, which are its sentences unless some were empty or longer than a
    side's budget (those are cut into consecutive pieces, each a segment).
    """

    input_ids: np.ndarray
    """(N, max_len) unsigned or int32 ids: ``[CLS] A [SEP] B [SEP]`` then padding."""
    a_len: np.ndarray
    """(N,) int32 tokens in A, without specials."""
    b_len: np.ndarray
    """(N,) int32 tokens in B, without specials; 0 without NSP."""
    nsp_label: np.ndarray | None
    """(N,) int8 0 = IsNext, 1 = NotNext; None without NSP."""
    doc_a: np.ndarray
    a_start: np.ndarray
    a_end: np.ndarray
    doc_b: np.ndarray
    b_start: np.ndarray
    b_end: np.ndarray

    @property
    def max_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def nsp(self) -> bool:
        return self.nsp_label is not None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self)
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError(f"example {index} out of range for {n} examples")
        first = int(self.a_len[i]) + 2  # [CLS] A [SEP]
        total = first + (int(self.b_len[i]) + 1 if self.nsp else 0)  # + B [SEP]
        positions = torch.arange(self.max_len)
        item = {
            "input_ids": torch.from_numpy(self.input_ids[i].astype(np.int64)),
            "token_type_ids": ((positions >= first) & (positions < total)).long(),
            "attention_mask": (positions < total).long(),
        }
        if self.nsp_label is not None:
            item["nsp_label"] = torch.tensor(int(self.nsp_label[i]), dtype=torch.long)
        return item


@dataclass(frozen=True, slots=True)  # one per example: keep them small
class _Record:
    """Where one example's segments come from, before its tokens are written."""

    doc_a: int
    a_start: int
    a_end: int
    doc_b: int = NOT_FROM_DOCUMENT
    b_start: int = 0
    b_end: int = 0
    label: int = IS_NEXT


def build_pair_examples(
    documents: list[list[list[int]]],
    max_len: int,
    specials: PairSpecials,
    nsp: bool,
    seed: int,
    nsp_prob: float = 0.5,
    split: str | None = None,
) -> PairExamples:
    """Examples of ``max_len`` tokens from tokenized ``documents`` (per document, per sentence, ids).

    Deterministic for a given ``seed``. ``split`` only names the split in error messages. Raises
    :class:`ConfigError` for ``max_len < 8`` (``data.block_size``) or a bad ``nsp_prob``, and
    :class:`DataError` when there is no text, or fewer than 2 non-empty documents with ``nsp``.
    """
    _check_settings(max_len, nsp_prob)
    budget = max_len - 3 if nsp else max_len - 2  # tokens left after [CLS] and one or two [SEP]
    piece_limit = budget // 2 if nsp else budget  # so one piece always fits on either side
    segments = [_segments(document, piece_limit) for document in documents]
    non_empty = [d for d, segs in enumerate(segments) if segs]
    _check_documents(len(non_empty), nsp, split)
    rng = np.random.default_rng(seed)
    records: list[_Record] = []
    for d in non_empty:
        if nsp:
            records.extend(_pair_records(d, segments, non_empty, budget, nsp_prob, rng))
        else:
            records.extend(_single_records(d, segments[d], budget))
    return _assemble(records, segments, max_len, specials, nsp)


def _check_settings(max_len: int, nsp_prob: float) -> None:
    """Raise one :class:`ConfigError` listing every bad setting."""
    problems = []
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < MIN_PAIR_LEN:
        problems.append(
            f"data.block_size={max_len!r}: masked LM needs sequences of at least {MIN_PAIR_LEN} tokens"
        )
    if isinstance(nsp_prob, bool) or not isinstance(nsp_prob, (int, float)) or not 0 <= nsp_prob <= 1:
        problems.append(f"task.nsp_prob={nsp_prob!r}: expected a number in [0, 1]")
    if problems:
        raise ConfigError(problems)


def _check_documents(n_non_empty: int, nsp: bool, split: str | None) -> None:
    """Raise :class:`DataError` when there is nothing to build examples from."""
    where = f"the {split} split" if split else "this split"
    if n_non_empty == 0:
        raise DataError(f"{where} has no text to build sentence-pair examples from; add documents")
    if nsp and n_non_empty < 2:
        in_split = f"in the {split} split" if split else "per split"
        raise DataError(
            f"NSP needs at least 2 documents {in_split}; {where} has {n_non_empty} non-empty document "
            "(documents are separated by blank lines); add documents or set task.nsp=false"
        )


def _segments(sentences: list[list[int]], limit: int) -> list[list[int]]:
    """The document's non-empty sentences, each longer than ``limit`` tokens cut into consecutive pieces."""
    pieces: list[list[int]] = []
    for sentence in sentences:
        ids = list(sentence)
        pieces.extend(ids[start : start + limit] for start in range(0, len(ids), limit))
    return pieces


def _take(segments: list[list[int]], start: int, budget: int, stop: int) -> tuple[int, int]:
    """Extend a run from ``segments[start]`` while it fits ``budget``, never past ``stop``.

    Returns ``(end, n_tokens)``; the run always holds at least its first segment.
    """
    end, used = start + 1, len(segments[start])
    while end < stop and used + len(segments[end]) <= budget:
        used += len(segments[end])
        end += 1
    return end, used


def _pair_records(
    d: int,
    segments: list[list[list[int]]],
    non_empty: list[int],
    budget: int,
    nsp_prob: float,
    rng: np.random.Generator,
) -> list[_Record]:
    """Walk document ``d`` into A/B pairs, A filling about half of ``budget`` and B the rest."""
    records: list[_Record] = []
    own = segments[d]
    pos = 0
    while pos < len(own):
        # A lone last segment has no next run, so it can only be paired with another document.
        not_next = rng.random() < nsp_prob or len(own) - pos == 1
        a_stop = len(own) if not_next else len(own) - 1  # an IsNext pair leaves B at least one segment
        a_end, a_len = _take(own, pos, budget // 2, a_stop)
        if not_next:
            other = _other_document(d, non_empty, rng)
            b_start = int(rng.integers(len(segments[other])))
            b_end, _ = _take(segments[other], b_start, budget - a_len, len(segments[other]))
            records.append(_Record(d, pos, a_end, other, b_start, b_end, NOT_NEXT))
            pos = a_end  # the run after A was not used: it starts the next example
        else:
            b_end, _ = _take(own, a_end, budget - a_len, len(own))
            records.append(_Record(d, pos, a_end, d, a_end, b_end, IS_NEXT))
            pos = b_end
    return records


def _other_document(d: int, non_empty: list[int], rng: np.random.Generator) -> int:
    """A non-empty document other than ``d``, uniformly at random."""
    j = int(rng.integers(len(non_empty) - 1))  # an index among the others: skip d's own slot
    own_index = bisect.bisect_left(non_empty, d)  # non_empty is sorted
    return non_empty[j + 1 if j >= own_index else j]


def _single_records(d: int, own: list[list[int]], budget: int) -> list[_Record]:
    """Walk document ``d`` into single runs of at most ``budget`` tokens."""
    records: list[_Record] = []
    pos = 0
    while pos < len(own):
        end, _ = _take(own, pos, budget, len(own))
        records.append(_Record(d, pos, end))
        pos = end
    return records


def _assemble(
    records: list[_Record], segments: list[list[list[int]]], max_len: int, specials: PairSpecials, nsp: bool
) -> PairExamples:
    """Write the tokens of every record into padded arrays."""
    max_token = max((max(piece) for doc in segments for piece in doc), default=0)
    max_id = max(specials.cls_id, specials.sep_id, specials.pad_id, max_token)
    input_ids = np.full((len(records), max_len), specials.pad_id, dtype=token_dtype(max_id + 1))
    a_len = np.zeros(len(records), dtype=np.int32)
    b_len = np.zeros(len(records), dtype=np.int32)
    for i, rec in enumerate(records):
        a = list(itertools.chain.from_iterable(segments[rec.doc_a][rec.a_start : rec.a_end]))
        row = [specials.cls_id, *a, specials.sep_id]
        if nsp:
            b = list(itertools.chain.from_iterable(segments[rec.doc_b][rec.b_start : rec.b_end]))
            row += [*b, specials.sep_id]
            b_len[i] = len(b)
        a_len[i] = len(a)
        input_ids[i, : len(row)] = row
    field = {name: np.array([getattr(r, name) for r in records], dtype=np.int32) for name in _PROVENANCE}
    labels = np.array([r.label for r in records], dtype=np.int8) if nsp else None
    return PairExamples(input_ids=input_ids, a_len=a_len, b_len=b_len, nsp_label=labels, **field)
