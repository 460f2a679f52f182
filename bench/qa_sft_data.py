"""Times the QA and SFT data pieces on synthetic data: ``python -m bench.qa_sft_data`` (standalone).

QA: 10,000 questions over 2,000 contexts of 120 words -> build_features (max_len 384, stride 128) and
predict_answers on random logits. SFT: 20,000 rows (half prompt/completion, half chats, 5-60 words a
side) -> render_examples and pack_examples into blocks of 1024. The tokenizer is the tests' tiny
sentencepiece BPE (420 pieces), so texts make more tokens than a real vocabulary would.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import numpy as np

from lmexp.data.sft import SFTRecord, pack_examples, render_examples
from lmexp.data.squad import Answer, QAExample, build_features, predict_answers
from lmexp.data.tokenizer import TokenizerConfig, train_or_load_tokenizer
from tests.data.conftest import LINES, WORDS


def main() -> None:
    config = TokenizerConfig(vocab_size=420, extra_special_tokens=["[CLS]", "[SEP]"])
    tok = train_or_load_tokenizer(LINES, "bench", config, Path(tempfile.mkdtemp()))
    rng = random.Random(0)
    contexts = [" ".join(rng.choice(WORDS) for _ in range(120)) for _ in range(2000)]
    examples = []
    for i in range(10_000):
        words = contexts[i % 2000].split(" ")
        j = rng.randrange(len(words) - 3)
        start = len(" ".join(words[:j])) + (1 if j else 0)
        question = " ".join(rng.choice(WORDS) for _ in range(10)) + "?"
        examples.append(
            QAExample(str(i), question, contexts[i % 2000], [Answer(" ".join(words[j : j + 3]), start)])
        )
    t = time.perf_counter()
    features = build_features(examples, tok, tok.special_id("[CLS]"), tok.special_id("[SEP]"), 384, 128)
    t_features = time.perf_counter() - t
    gen = np.random.default_rng(0)
    starts = [gen.standard_normal(len(f.input_ids)).astype(np.float32) for f in features]
    ends = [gen.standard_normal(len(f.input_ids)).astype(np.float32) for f in features]
    t = time.perf_counter()
    predict_answers(examples, features, starts, ends, null_threshold=0.0)
    t_predict = time.perf_counter() - t
    n_tokens = sum(len(f.input_ids) for f in features)
    print(
        f"QA: {len(examples)} questions, {len(features)} windows, {n_tokens} tokens: "
        f"build_features {t_features:.2f} s, predict_answers {t_predict:.2f} s"
    )
    records = []
    for i in range(20_000):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
        reply = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
        if i % 2:
            records.append(SFTRecord(str(i), prompt=prompt, completion=" " + reply))
        else:
            chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
            records.append(SFTRecord(str(i), messages=chat))
    t = time.perf_counter()
    rendered = render_examples(records, tok, start_ids=(tok.eos_id,))
    t_render = time.perf_counter() - t
    t = time.perf_counter()
    stats = pack_examples(rendered, 1024, tok.pad_id).stats
    t_pack = time.perf_counter() - t
    print(
        f"SFT: {len(records)} rows, {stats.n_tokens} tokens: render_examples {t_render:.2f} s, pack_examples "
        f"{t_pack:.2f} s into {stats.n_blocks} blocks of 1024 (fill {stats.fill:.4f})"
    )


if __name__ == "__main__":
    main()
