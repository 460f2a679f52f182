"""The small tokenizer interface the fine-tuning data code needs, and an adapter for Hugging Face tokenizers.

:mod:`lmexp.data.squad` and :mod:`lmexp.data.sft` take any object with the members of
:class:`TextTokenizer`: lmexp's sentencepiece :class:`~lmexp.data.tokenizer.Tokenizer` has them, and
:class:`HFTokenizer` gives them to a Hugging Face fast tokenizer. A tokenizer that also has a
``chat_template`` (not None) and ``apply_chat_template`` renders conversations with its own template
(:class:`ChatTokenizer`); without one, :mod:`lmexp.data.sft` uses its plain template.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from lmexp.errors import ConfigError

Span = tuple[int, int]  # (start, end) character offsets of a token in the text it was encoded from


@runtime_checkable
class TextTokenizer(Protocol):
    """What the QA and SFT data code needs from a tokenizer. No special tokens are added by ``encode``."""

    eos_id: int
    """Id that ends a text (appended to completions; the plain chat template's end-of-turn marker)."""
    pad_id: int
    """Id used for padding; never a loss target."""

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without bos/eos or other added special tokens."""
        ...

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[Span]]]:
        """Token ids of each text and the character span of each token in that text."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``."""
        ...


@runtime_checkable
class ChatTokenizer(TextTokenizer, Protocol):
    """A tokenizer with a Jinja chat template, called as Hugging Face's ``apply_chat_template``."""

    chat_template: str | None
    """The Jinja template; None means the tokenizer has none (the plain template is used)."""

    def apply_chat_template(
        self, conversation: list[dict[str, str]], tokenize: bool = False, add_generation_prompt: bool = False
    ) -> str:
        """The conversation rendered as text (``tokenize=False``), with the assistant header if asked."""
        ...


class HFTokenizer:
    """A Hugging Face fast tokenizer (``PreTrainedTokenizerFast``) seen through :class:`ChatTokenizer`.

    Args:
        tokenizer: the Hugging Face tokenizer; it must be a fast one (offsets come from the Rust
            tokenizers library) and have an eos token.
    """

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(
                f"tokenizer: {type(tokenizer).__name__} is not a fast tokenizer; character offsets need "
                "a PreTrainedTokenizerFast (load it with use_fast=True)"
            )
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"tokenizer: {type(tokenizer).__name__} has no eos token; set eos_token")
        self.hf = tokenizer
        self.eos_id: int = tokenizer.eos_token_id
        # Padding positions are masked out of attention and loss, so eos is a safe pad when none is defined.
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's chat template, or None."""
        return self.hf.chat_template

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without the special tokens the tokenizer would add around it."""
        return self.hf(list(texts), add_special_tokens=False)["input_ids"]

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[Span]]]:
        """Token ids of each text and each token's character span, as the Rust tokenizer reports it."""
        encoded = self.hf(list(texts), add_special_tokens=False, return_offsets_mapping=True)
        return [
            (list(ids), [(int(a), int(b)) for a, b in spans])
            for ids, spans in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
        ]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; special tokens decode to nothing, as lmexp's tokenizer does."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def apply_chat_template(
        self, conversation: list[dict[str, str]], tokenize: bool = False, add_generation_prompt: bool = False
    ) -> str:
        """The conversation rendered by the tokenizer's template, as text."""
        if tokenize:
            raise ValueError("HFTokenizer.apply_chat_template renders text only; encode the result")
        return self.hf.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.hf).__name__}, vocab_size={len(self.hf)})"


def has_chat_template(tokenizer: object) -> bool:
    """Whether ``tokenizer`` renders conversations with its own template."""
    return getattr(tokenizer, "chat_template", None) is not None and hasattr(tokenizer, "apply_chat_template")
