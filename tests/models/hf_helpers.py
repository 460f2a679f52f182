"""Tiny Hugging Face models and their tokenizers, built from configs and saved to a directory: no downloads.

Tokenizers are trained with the ``tokenizers`` library on documents of lmexp's built-in corpus: byte-level
BPE (GPT-2's kind) for the decoders, WordPiece (BERT's kind) for BERT. Models are transformers classes built
from small configs with a fixed seed and ``save_pretrained`` next to their tokenizer, as a user's saved
model would be.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("gpt2", "llama", "qwen2", "bert")
DECODERS = ("gpt2", "llama", "qwen2")
VOCAB = 384
POSITIONS = 128


@cache
def corpus(n_documents: int = 300) -> tuple[str, ...]:
    """Documents of the built-in corpus (its default grammar), the same every time."""
    from lmexp.data.corpus import GrammarConfig, build_grammar, generate_documents

    return tuple(generate_documents(build_grammar(GrammarConfig()), n_documents, seed=0))


def byte_level_tokenizer(pad: bool = False) -> Any:
    """A GPT-2-style tokenizer: byte-level BPE, ``<|endoftext|>`` as eos (and bos); a pad token on request."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>"] + (["<pad>"] if pad else [])
    rust = Tokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rust.train_from_iterator(corpus(), trainer)
    names = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}
    return PreTrainedTokenizerFast(tokenizer_object=rust, **names, **({"pad_token": "<pad>"} if pad else {}))


def wordpiece_tokenizer(mask: bool = True, pad: bool = True, extra_texts: tuple[str, ...] = ()) -> Any:
    """A BERT-style tokenizer: WordPiece with [UNK] [CLS] [SEP] (and [PAD], [MASK] unless turned off);
    trained on ``extra_texts`` too (e.g. toy data with characters the corpus lacks, such as "?")."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = (["[PAD]"] if pad else []) + ["[UNK]", "[CLS]", "[SEP]"] + (["[MASK]"] if mask else [])
    rust = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    rust.normalizer = normalizers.BertNormalizer(lowercase=True)
    rust.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    rust.decoder = decoders.WordPiece()
    rust.train_from_iterator(
        corpus() + extra_texts,
        trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False),
    )
    cls_id, sep_id = rust.token_to_id("[CLS]"), rust.token_to_id("[SEP]")
    rust.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    names = {"unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
    names |= ({"mask_token": "[MASK]"} if mask else {}) | ({"pad_token": "[PAD]"} if pad else {})
    return PreTrainedTokenizerFast(tokenizer_object=rust, **names)


def tiny_config(family: str, tokenizer: Any, **overrides: Any) -> Any:
    """A small transformers config of ``family`` for ``tokenizer`` (2 layers, 32 wide)."""
    import transformers

    V = len(tokenizer)
    specials = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    specials["pad_token_id"] = tokenizer.pad_token_id
    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=POSITIONS, vocab_size=V)
    elif family in ("llama", "qwen2"):
        cls = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
        config = cls(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            hidden_size=32,
            intermediate_size=64,
            max_position_embeddings=POSITIONS,
            vocab_size=V,
            tie_word_embeddings=family == "qwen2",
        )
    elif family == "bert":
        config = transformers.BertConfig(
            num_hidden_layers=2,
            num_attention_heads=2,
            hidden_size=32,
            intermediate_size=64,
            max_position_embeddings=POSITIONS,
            vocab_size=V,
        )
    else:
        raise ValueError(family)
    for key, value in {**specials, **overrides}.items():
        setattr(config, key, value)
    return config


def save_tiny_model(directory: Path, family: str, seed: int = 0, tokenizer: Any = None) -> Path:
    """A tiny ``family`` model (causal LM, or masked LM for bert) and its tokenizer in ``directory``."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if tokenizer is None:
        tokenizer = wordpiece_tokenizer() if family == "bert" else byte_level_tokenizer()
    config = tiny_config(family, tokenizer)
    auto = transformers.AutoModelForMaskedLM if family == "bert" else transformers.AutoModelForCausalLM
    torch.manual_seed(seed)
    model = auto.from_config(config)
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
