"""Tiny real models and tokenizers for the harness tests (helpers.py scores text by hand).

The sentencepiece tokenizer is trained on a few hundred built-in documents; the lmexp GPT and the Hugging
Face GPT2LMHeadModel are built from configs (random weights: the tests compare the harness with the same
model scored by hand, so the model need not be any good).
"""

from __future__ import annotations

import pytest
import torch

from lmexp.data.corpus import GrammarConfig, build_grammar, generate_documents
from lmexp.data.tokenizer import TokenizerConfig, train_or_load_tokenizer
from lmexp.models.gpt import GPTConfig

MAX_SEQ_LEN = 64


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep ``datasets``' default cache (where it puts lock files even when given a cache_dir) in tmp."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets")


@pytest.fixture(scope="session")
def grammar():
    return build_grammar(GrammarConfig())


@pytest.fixture(scope="session")
def documents(grammar) -> list[str]:
    return generate_documents(grammar, 300, seed=0)


@pytest.fixture(scope="session")
def sp_tokenizer(documents, cache_dir):
    return train_or_load_tokenizer(documents, "harness-tests-300", TokenizerConfig(vocab_size=512), cache_dir)


@pytest.fixture(scope="session")
def gpt(sp_tokenizer):
    torch.manual_seed(0)
    config = GPTConfig(
        n_layer=2, n_head=2, n_embd=32, max_seq_len=MAX_SEQ_LEN, vocab_size=sp_tokenizer.vocab_size
    )
    return config.build().eval()


@pytest.fixture(scope="session")
def hf_tokenizer(sp_tokenizer):
    """lmexp's sentencepiece model as a transformers PreTrainedTokenizerFast (lmexp's exporter, offline)."""
    from lmexp.inference.export import hf_tokenizer as exported

    return exported(sp_tokenizer.path, bert=False, max_length=MAX_SEQ_LEN)


@pytest.fixture(scope="session")
def hf_gpt2(hf_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    config = GPT2Config(
        vocab_size=len(hf_tokenizer), n_positions=MAX_SEQ_LEN, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=hf_tokenizer.eos_token_id, eos_token_id=hf_tokenizer.eos_token_id,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()
