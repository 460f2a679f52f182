"""Fixtures of the data tests: tiny real tokenizers for the QA and SFT tests, built offline in seconds.

``spm_tokenizer``: lmexp's sentencepiece :class:`~lmexp.data.tokenizer.Tokenizer` (BPE, byte fallback,
``[CLS]``/``[SEP]`` as extra special tokens). ``hf_tokenizer``: a byte-level BPE trained with the
``tokenizers`` library on a few lines, wrapped in ``PreTrainedTokenizerFast`` with a ChatML-like
chat template, saved with ``save_pretrained`` and loaded back, as a downloaded one would be.
"""

from __future__ import annotations

import random

import pytest

from lmexp.data.text_tokenizer import HFTokenizer
from lmexp.data.tokenizer import Tokenizer, TokenizerConfig, train_or_load_tokenizer

WORDS = (
    "the a an one old young small large red green cat dog bird horse river mountain city garden castle "
    "king queen who what when where which wrote built founded lives runs sings reads is was in of on by "
    "with and but paris france london england 1901 1850 capital book poem answer question"
).split()
SPECIALS = ["[CLS]", "[SEP]"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HF_SPECIALS = ["<|endoftext|>", "<pad>", "[CLS]", "[SEP]", "<|im_start|>", "<|im_end|>"]


def make_lines(n_lines: int, seed: int = 0) -> list[str]:
    """English-like sentences with punctuation and numbers."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    return lines


LINES = make_lines(400)


@pytest.fixture(scope="session")
def spm_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    config = TokenizerConfig(kind="bpe", vocab_size=420, extra_special_tokens=SPECIALS, num_threads=1)
    return train_or_load_tokenizer(LINES, "qa-sft-tests", config, tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    rust.post_processor = processors.ByteLevel(trim_offsets=True)  # offsets without the leading space
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=HF_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rust.train_from_iterator(LINES, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=rust,
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        cls_token="[CLS]",
        sep_token="[SEP]",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    wrapped.chat_template = CHATML
    directory = tmp_path_factory.mktemp("hf-tokenizer")
    wrapped.save_pretrained(directory)
    return HFTokenizer(AutoTokenizer.from_pretrained(directory))


def special_ids(tokenizer: Tokenizer | HFTokenizer) -> tuple[int, int]:
    """The ``[CLS]`` and ``[SEP]`` ids of either test tokenizer."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.hf.cls_token_id, tokenizer.hf.sep_token_id
    return tokenizer.special_id("[CLS]"), tokenizer.special_id("[SEP]")
