"""Data: sentencepiece training and encoding throughput of lmexp's tokenizer on a large corpus.

The corpus is the built-in generator's (lmexp/data/corpus.py), grown to at least 50 MB and cached under
``bench/out/``. lmexp trains its sentencepiece BPE tokenizer through its own code path (every core,
lmexp's settings) and encodes every line of the corpus in one batched call, as the data module does.
The peer is Hugging Face ``tokenizers`` (Rust), training a BPE model of the same vocabulary size on the
same lines with the same thread count, and encoding them with ``encode_batch``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from bench.common import Result

OUT = Path(__file__).resolve().parent / "out"
CORPUS_MB, SMOKE_CORPUS_MB = 50, 1
VOCAB_SIZE = 8000


def corpus_lines(megabytes: int) -> list[str]:
    """Non-empty lines of a built-in corpus of at least ``megabytes`` MB (generated once, then read back)."""
    path = OUT / f"corpus-{megabytes}mb.txt"
    if not path.is_file():
        from lmexp.data.corpus import GrammarConfig, build_grammar, generate_documents

        grammar = build_grammar(GrammarConfig())
        documents, size, seed = [], 0, 0
        # 20,000 documents are ~7 MB: the smoke corpus takes one batch of its size, not 7x its size
        per_batch = min(20_000, 3_000 * megabytes)
        while size < megabytes * 1_000_000:
            batch = generate_documents(grammar, per_batch, seed=seed)
            documents += batch
            size += sum(len(d.encode()) + 2 for d in batch)
            seed += 1
        OUT.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n\n".join(documents))
        os.replace(tmp, path)
    return [line for line in path.read_text().split("\n") if line.strip()]


def _megabytes(lines: list[str]) -> float:
    return sum(len(line.encode()) + 1 for line in lines) / 1e6


def lmexp_train(lines: list[str], directory: Path, vocab_size: int):
    from lmexp.data.tokenizer import TokenizerConfig, train_or_load_tokenizer

    start = time.perf_counter()
    tokenizer = train_or_load_tokenizer(
        ["\n".join(lines)], "bench-corpus", TokenizerConfig(vocab_size=vocab_size), directory
    )
    return tokenizer, time.perf_counter() - start


def hf_train(lines: list[str], vocab_size: int):
    from tokenizers import SentencePieceBPETokenizer

    tokenizer = SentencePieceBPETokenizer()
    start = time.perf_counter()
    tokenizer.train_from_iterator(lines, vocab_size=vocab_size, show_progress=False)
    return tokenizer, time.perf_counter() - start


def run(smoke: bool = False, overrides: list[str] | None = None) -> list[Result]:
    megabytes = SMOKE_CORPUS_MB if smoke else CORPUS_MB
    vocab_size = 1000 if smoke else VOCAB_SIZE
    lines = corpus_lines(megabytes)
    size = _megabytes(lines)
    threads = os.cpu_count() or 1
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # HF tokenizers' thread pool: same cores

    with tempfile.TemporaryDirectory(prefix="lmexp-bench-") as cache:
        ours, our_train = lmexp_train(lines, Path(cache), vocab_size)
        theirs, their_train = hf_train(lines, vocab_size)

        start = time.perf_counter()
        our_ids = ours.encode(lines)
        our_encode = time.perf_counter() - start
        start = time.perf_counter()
        their_ids = theirs.encode_batch(lines)
        their_encode = time.perf_counter() - start

    our_tokens = sum(len(ids) for ids in our_ids)
    their_tokens = sum(len(encoding.ids) for encoding in their_ids)
    notes = [f"{size:.1f} MB, {len(lines):,} lines, vocab {vocab_size}, {threads} threads, one run each"]
    return [
        Result(
            name="data/tokenizer_train",
            values={"lmexp_mb_per_sec": size / our_train, "hf_mb_per_sec": size / their_train},
            ratio=their_train / our_train,
            ratio_meaning="lmexp (sentencepiece) / HF tokenizers training MB/s",
            notes=notes,
        ),
        Result(
            name="data/tokenizer_encode",
            values={
                "lmexp_mb_per_sec": size / our_encode,
                "hf_mb_per_sec": size / their_encode,
                "lmexp_tokens_per_sec": our_tokens / our_encode,
                "hf_tokens_per_sec": their_tokens / their_encode,
                "lmexp_tokens_per_mb": our_tokens / size,
                "hf_tokens_per_mb": their_tokens / size,
            },
            ratio=their_encode / our_encode,
            ratio_meaning="lmexp (sentencepiece, batched) / HF tokenizers encode_batch MB/s",
            notes=notes,
        ),
    ]
