"""Shared by the data-engine tests: small random documents, corpus files in every format, a tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

from lmexp.data.tokenizer import Tokenizer, TokenizerConfig, train_or_load_tokenizer

WORDS = "the a small red cat dog bird runs sleeps over under river city today and but quietly".split()
UNICODE_WORDS = ["naïve", "café", "Größe", "日本語", "ε=mc²", "🙂"]


def make_documents(n_documents: int, seed: int = 0) -> list[str]:
    """Documents of 3 to 40 words over two lines, some with non-ASCII words (bytes != characters)."""
    rng = random.Random(seed)
    documents = []
    for _ in range(n_documents):
        words = [
            rng.choice(WORDS if rng.random() < 0.9 else UNICODE_WORDS) for _ in range(rng.randint(3, 40))
        ]
        cut = rng.randint(1, len(words) - 1)  # two non-empty lines
        documents.append(" ".join(words[:cut]) + ".\n" + " ".join(words[cut:]))
    return documents


def write_txt(path: Path, documents: list[str]) -> Path:
    """Documents separated by blank lines (one with stray whitespace, to exercise the rule)."""
    path.write_text("\n\n".join(documents) + "\n \t\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, documents: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(documents)))
    return path


def train_tokenizer(documents: list[str], cache: Path, vocab_size: int = 400) -> Tokenizer:
    return train_or_load_tokenizer(documents, "engine-tests", TokenizerConfig(vocab_size=vocab_size), cache)
