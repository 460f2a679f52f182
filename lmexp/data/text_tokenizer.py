"""The tokenizer interface the fine-tuning data code needs, and Hugging Face tokenizers as run tokenizers.

:mod:`lmexp.data.squad` and :mod:`lmexp.data.sft` take any object with the members of
:class:`TextTokenizer`: lmexp's sentencepiece :class:`~lmexp.data.tokenizer.Tokenizer` has them, and
:class:`HFTokenizer` gives them to a Hugging Face fast tokenizer. A tokenizer that also has a
``chat_template`` (not None) and ``apply_chat_template`` renders conversations with its own template
(:class:`ChatTokenizer`); without one, :mod:`lmexp.data.sft` uses its plain template.

:class:`HFTokenizer` is also a whole run tokenizer, as the sentencepiece one is (``vocab_size``, the special
ids, ``special_id``, ``word_start_mask`` for bits per word, ``path``): a run whose model brings its own
tokenizer (``model=hf``, ``init_from=hf:...``) packs, caches and scores its data with it.
:meth:`HFTokenizer.load` reads a directory of tokenizer files (what ``save_pretrained`` writes).
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lmexp.errors import ConfigError, DataError

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


# lmexp's names of the special tokens tasks ask for (``Task.special_tokens``) -> Hugging Face's attribute.
_SPECIAL_ATTRIBUTES = {
    "[CLS]": "cls_token",
    "[SEP]": "sep_token",
    "[MASK]": "mask_token",
    "[PAD]": "pad_token",
}
_WORDPIECE = "WordPiece"


class HFTokenizer:
    """A Hugging Face fast tokenizer (``PreTrainedTokenizerFast``) seen through :class:`ChatTokenizer`, and a
    run tokenizer (the members of :class:`lmexp.data.tokenizer.Tokenizer`).

    Special ids where a tokenizer lacks one: eos is the sep token of encoders (BERT has no eos); pad is eos
    (padded positions are masked out of attention and never scored; :attr:`has_pad` tells whether the
    tokenizer defines its own); bos is the cls token, else eos; unk is pad (byte-level tokenizers never
    produce an unknown token).

    Args:
        tokenizer: the Hugging Face tokenizer; it must be a fast one (offsets come from the Rust
            tokenizers library) and have an eos (or sep) token.
        path: the directory its files were loaded from (a run's tokenizer has one: it is cached and
            checkpointed).
    """

    def __init__(self, tokenizer: Any, path: str | Path | None = None) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(
                f"tokenizer: {type(tokenizer).__name__} is not a fast tokenizer; character offsets need "
                "a PreTrainedTokenizerFast (load it with use_fast=True)"
            )
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if eos is None:
            raise ConfigError(f"tokenizer: {type(tokenizer).__name__} has no eos token; set eos_token")
        self.hf = tokenizer
        self.path = Path(path) if path is not None else None
        self.eos_id: int = eos
        self.has_pad = tokenizer.pad_token_id is not None
        self.pad_id: int = tokenizer.pad_token_id if self.has_pad else self.eos_id
        self.bos_id: int = next(
            i for i in (tokenizer.bos_token_id, tokenizer.cls_token_id, eos) if i is not None
        )
        self.unk_id: int = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else self.pad_id
        self.vocab_size: int = len(tokenizer)  # the base vocabulary and every added token

    @classmethod
    def load(cls, directory: str | Path, trust_remote_code: bool = False) -> HFTokenizer:
        """The tokenizer whose files (``tokenizer.json``, ``tokenizer_config.json``, ...) are in
        ``directory``; :class:`DataError` when there is none."""
        from transformers import AutoTokenizer

        directory = Path(directory).expanduser()
        if not directory.is_dir():
            raise DataError(
                f"tokenizer: {directory} is not a directory; expected Hugging Face tokenizer files"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(directory), trust_remote_code=trust_remote_code, local_files_only=True
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            reason = " ".join(str(error).split())[:200]
            raise DataError(
                f"tokenizer: {directory} holds no readable Hugging Face tokenizer ({reason})"
            ) from None
        return cls(tokenizer, directory)

    @property
    def files(self) -> list[Path]:
        """The tokenizer's files, sorted (what the token cache and checkpoints are keyed by)."""
        if self.path is None:
            return []
        return sorted(p for p in self.path.iterdir() if p.is_file() and not p.name.startswith("."))

    def special_id(self, piece: str) -> int:
        """The id of a special token by lmexp's name (``[CLS]``, ``[SEP]``, ``[MASK]``, ``[PAD]``: the
        tokenizer's own cls/sep/mask/pad token, whatever its spelling) or of a token of the vocabulary;
        :class:`ConfigError` naming what is missing."""
        attribute = _SPECIAL_ATTRIBUTES.get(piece)
        token_id = getattr(self.hf, f"{attribute}_id") if attribute else self.hf.convert_tokens_to_ids(piece)
        if token_id is None or (attribute is None and token_id == self.hf.unk_token_id):
            what = f"no {attribute.removesuffix('_token')} token" if attribute else f"no token {piece!r}"
            raise ConfigError(f"tokenizer {self._where()} has {what}")
        return int(token_id)

    def missing(self, pieces: Sequence[str]) -> list[str]:
        """The special tokens among ``pieces`` (lmexp's names) that the tokenizer lacks, as Hugging Face
        names them (``mask token``)."""
        missing = []
        for piece in pieces:
            attribute = _SPECIAL_ATTRIBUTES.get(piece)
            if attribute and getattr(self.hf, f"{attribute}_id") is None:
                missing.append(f"{attribute.removesuffix('_token')} token")
        return missing

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id`` (as the tokenizer spells it, e.g. ``Ġthe``)."""
        return self.hf.convert_ids_to_tokens(int(token_id))

    def word_start_mask(self) -> np.ndarray:
        """bool[vocab_size]: True for tokens that begin a whitespace-separated word, for bits per word.

        A token begins a word when its text starts with whitespace (byte-level ``Ġ``/``Ċ``, sentencepiece's
        ``▁``) or, for WordPiece, when it is neither a ``##`` continuation nor punctuation. Byte-level
        tokenizers do not mark a text's first word, which follows the document's opening eos; each document
        also ends with one eos label, so for them eos counts as the word its document's first word is.
        Special tokens count as no word. (#14's data engine counts words from the text itself.)
        """
        backend = self.hf.backend_tokenizer
        model = json.loads(backend.to_str())["model"]
        pieces = self.hf.convert_ids_to_tokens(list(range(self.vocab_size)))
        if model.get("type") == _WORDPIECE:
            prefix = model.get("continuing_subword_prefix") or "##"
            # WordPiece splits punctuation off words ("dog." -> dog .): a lone punctuation piece is no word
            mask = np.array(
                [not piece.startswith(prefix) and not _punctuation(piece) for piece in pieces], dtype=bool
            )
        else:
            mask = np.array([_surface(backend, piece)[:1].isspace() for piece in pieces], dtype=bool)
        mask[list(self.hf.all_special_ids)] = False
        if model.get("type") != _WORDPIECE and not self._marks_first_word():
            mask[self.eos_id] = True
        return mask

    def _marks_first_word(self) -> bool:
        """Whether the first word of a text gets a word-start token of its own (a prefix space)."""
        first = self.encode(["a b"])[0][0]
        return _surface(self.hf.backend_tokenizer, self.hf.convert_ids_to_tokens(first))[:1].isspace()

    def _where(self) -> str:
        return str(self.path) if self.path is not None else type(self.hf).__name__

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's chat template, or None."""
        return self.hf.chat_template

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without the special tokens the tokenizer would add around it (documents
        of any length: the Rust tokenizer is called directly, without the model-length warning)."""
        backend = self.hf.backend_tokenizer
        if backend.truncation is not None or backend.padding is not None:  # left over from a call of self.hf
            backend.no_truncation()
            backend.no_padding()
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]

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


def _punctuation(piece: str) -> bool:
    """Whether a vocabulary entry is punctuation only (Unicode categories P*)."""
    return bool(piece) and all(unicodedata.category(char).startswith("P") for char in piece)


def _surface(backend: Any, piece: str) -> str:
    """The text a vocabulary entry stands for: sentencepiece's ``▁`` is a space; byte-level entries
    (``Ġthe``) go through the tokenizer's own decoder."""
    if piece.startswith("\u2581"):
        return " " + piece[1:]
    if backend.decoder is None:
        return piece
    try:
        return backend.decoder.decode([piece])
    except Exception:  # noqa: BLE001 - a decoder that cannot render a lone piece: take it as spelled
        return piece


def has_chat_template(tokenizer: object) -> bool:
    """Whether ``tokenizer`` renders conversations with its own template."""
    return getattr(tokenizer, "chat_template", None) is not None and hasattr(tokenizer, "apply_chat_template")
