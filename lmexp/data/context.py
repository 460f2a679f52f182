"""What every ``data`` config offers, and what a data module takes from outside its config (the run, the
task and the model kind)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from lmexp.config.schema import Schema
from lmexp.data.tokenizer import TokenizerConfig


class DataConfig(Schema):
    """Base of the ``data`` config dataclasses (``conf/data/*.yaml``); each builds its data module."""

    group: ClassVar[str] = "data"
    example_formats: ClassVar[tuple[str, ...]] = ()
    """The examples its data module can give (a task's ``data_format``)."""
    block_size: int

    def training_problems(self) -> list[str]:
        """What this config lacks for training (files that are optional for evaluation)."""
        return []

    def build(self, context: DataContext) -> Any:
        """The data module (it reads no file until ``prepare()``)."""
        raise NotImplementedError


@dataclass
class DataContext:
    """Everything a ``data`` config's ``build`` needs besides its own settings."""

    tokenizer: TokenizerConfig
    """The sentencepiece settings, with the task's special tokens reserved."""
    cache_dir: Path
    """Where corpora, tokenizers and token files are cached (shared by runs)."""
    seed: int = 0
    """The run's seed (the training order follows from it)."""
    example_format: str = "blocks"
    """What the task reads: ``blocks``, ``pairs``, ``classify`` or ``ner`` (the task's ``data_format``)."""
    nsp: bool = False
    """Masked LM: make next-sentence-prediction pairs."""
    layout: str = "eos"
    """How the model kind frames a labelled example: ``cls_sep`` or ``eos`` (its registry spec)."""
    tokenizer_model: bytes | None = None
    """A ready sentencepiece model (a pre-trained run's, or a checkpoint's) instead of training one."""
    tokenizer_dir: Path | None = None
    """A Hugging Face tokenizer's directory (the model's own with model=hf or init_from=hf:..., or a
    checkpoint's), used instead of a sentencepiece tokenizer."""
    labels: list[str] | None = None
    """Fine-tuning: the label set (from a checkpoint); None = the training split's."""

    def given_tokenizer(self) -> Any:
        """The tokenizer this run is given (a Hugging Face one, or a ready sentencepiece model), loaded; None
        when the data module trains (or loads its cached) sentencepiece tokenizer."""
        from lmexp.data.text_tokenizer import HFTokenizer
        from lmexp.data.tokenizer import Tokenizer
        from lmexp.data.tokenizer_store import cache_tokenizer_model

        if self.tokenizer_dir is not None:
            return HFTokenizer.load(self.tokenizer_dir)
        if self.tokenizer_model is not None:
            model_file = cache_tokenizer_model(self.tokenizer_model, self.cache_dir)
            return Tokenizer.load(model_file, self.tokenizer.resolved_threads())
        return None
