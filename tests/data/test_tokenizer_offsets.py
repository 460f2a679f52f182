"""Tests for ``Tokenizer.encode_with_offsets`` (pieces' character spans) and the tokenizer protocols."""

from __future__ import annotations

import pytest

from lmexp.data.text_tokenizer import ChatTokenizer, HFTokenizer, TextTokenizer, has_chat_template
from lmexp.data.tokenizer import Tokenizer

TEXTS = [
    "The old king wrote a poem in 1901.",
    "  Who   built\tthe castle?  ",  # leading, repeated and trailing whitespace, a tab
    "Ünïcode café — 😀 by the river",  # byte-fallback characters (several pieces for one character)
    "[CLS] who lives in paris [SEP] the queen",  # extra special tokens are single pieces
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_spans_tile_the_text(spm_tokenizer: Tokenizer, text: str) -> None:
    ((ids, spans),) = spm_tokenizer.encode_with_offsets([text])
    assert ids == spm_tokenizer.encode([text])[0]
    assert len(spans) == len(ids)
    if not text.strip():
        assert spans == []
        return
    # Consecutive spans touch: together they cover the text from its first non-space character to the
    # end of its last non-space character, each character exactly once.
    assert spans[0][0] == len(text) - len(text.lstrip())
    assert spans[-1][1] == len(text.rstrip())
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end == start
    assert all(start <= end for start, end in spans)
    assert "".join(text[start:end] for start, end in spans) == text.strip()


def test_each_span_is_its_piece(spm_tokenizer: Tokenizer) -> None:
    text = "Who built the castle in 1850?"  # single spaces: normalisation changes nothing
    ((ids, spans),) = spm_tokenizer.encode_with_offsets([text])
    pieces = [spm_tokenizer.id_to_piece(i).replace("\u2581", " ") for i in ids]
    # "▁" stands for the space before a word; the first word's comes from sentencepiece's dummy prefix.
    assert [text[start:end] for start, end in spans] == [pieces[0].lstrip(" "), *pieces[1:]]


def test_byte_fallback_character_is_spanned_by_its_last_byte(spm_tokenizer: Tokenizer) -> None:
    text = "a 😀 b"
    ((ids, spans),) = spm_tokenizer.encode_with_offsets([text])
    emoji = text.index("😀")
    byte_spans = [
        span
        for token_id, span in zip(ids, spans, strict=True)
        if spm_tokenizer.id_to_piece(token_id).startswith("<0x")
    ]
    assert byte_spans == [(emoji, emoji)] * 3 + [(emoji, emoji + 1)]


def test_batch_matches_single(spm_tokenizer: Tokenizer) -> None:
    assert spm_tokenizer.encode_with_offsets(TEXTS) == [
        spm_tokenizer.encode_with_offsets([t])[0] for t in TEXTS
    ]


def test_both_tokenizers_satisfy_the_protocols(spm_tokenizer: Tokenizer, hf_tokenizer: HFTokenizer) -> None:
    assert isinstance(spm_tokenizer, TextTokenizer) and not has_chat_template(spm_tokenizer)
    assert isinstance(hf_tokenizer, ChatTokenizer) and has_chat_template(hf_tokenizer)
    ((ids, spans),) = hf_tokenizer.encode_with_offsets(["who wrote the poem?"])
    assert ids == hf_tokenizer.encode(["who wrote the poem?"])[0]
    assert [("who wrote the poem?")[a:b] for a, b in spans if b > a][-1] == "?"
    assert hf_tokenizer.decode(ids) == "who wrote the poem?"
