"""Sentencepiece tokenizers: training from in-memory lines, a shared on-disk cache, and a thin wrapper;
:func:`load_tokenizer` opens any tokenizer lmexp can prepare data with (sentencepiece or Hugging Face).

Every tokenizer has the same fixed special ids (pad 0, unk 1, bos 2, eos 3) and keeps sentencepiece's
default whitespace handling (``add_dummy_prefix``, whitespace collapsed to ``"▁"``). Corpora are sampled
for training by lmexp/data/tokenizer_sample.py, so sentencepiece never sees a whole large corpus.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import sentencepiece as spm

from lmexp.cache import atomic_write_json, build_lock, fingerprint, fingerprint_problem, stable_hash
from lmexp.config.schema import Schema, at_least, between, listed, positive
from lmexp.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PAD_PIECE, UNK_PIECE, BOS_PIECE, EOS_PIECE = "<pad>", "<unk>", "<s>", "</s>"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
WORD_START = "\u2581"  # "▁", sentencepiece's marker for a preceding space
MIN_VOCAB_SIZE = 64
_N_BYTE_PIECES = 256
_TRAINING_SEED = 1234  # sentencepiece samples lines beyond input_sentence_size; fixed for reproducibility
# Sentencepiece silently drops training lines longer than max_sentence_length bytes, so long lines are cut
# at whitespace into chunks of at most this many characters (4 UTF-8 bytes each at worst).
_MAX_LINE_CHARS = 4096
_MAX_SENTENCE_BYTES = 4 * _MAX_LINE_CHARS
MODEL_FILE, VOCAB_FILE, META_FILE = "spm.model", "spm.vocab", "meta.json"


@dataclass
class TokenizerConfig(Schema):
    """``conf/tokenizer/*.yaml``: how to train a sentencepiece tokenizer; every field except
    ``num_threads`` is part of the cache key."""

    group: ClassVar[str] = "tokenizer"

    kind: Literal["bpe", "unigram"] = "bpe"
    """Sentencepiece model type: ``bpe`` or ``unigram``."""
    vocab_size: int = at_least(4096, MIN_VOCAB_SIZE)
    """Total number of pieces, including the 4 fixed specials, byte pieces and extra special tokens."""
    character_coverage: float = between(0.9995, 0.0, 1.0, low_open=True)
    """Fraction of the training text's characters that get pieces; rarer ones go through byte fallback."""
    byte_fallback: bool = True
    """Encode characters outside the vocabulary as UTF-8 byte pieces instead of ``<unk>``."""
    extra_special_tokens: list[str] = listed(list)
    """Extra tokens (e.g. ``["[CLS]", "[SEP]", "[MASK]"]``) that always encode as one id, never split."""
    pad_piece: str = PAD_PIECE
    """The text of the padding token (id 0); masked-LM runs name it ``[PAD]``, BERT's spelling."""
    unk_piece: str = UNK_PIECE
    """The text of the unknown token (id 1); masked-LM runs name it ``[UNK]``."""
    max_training_sentences: int = positive(2_000_000)
    """Sentencepiece ``input_sentence_size``: lines beyond this many are sampled."""
    num_threads: int = at_least(0, 0)
    """Threads for training and batch encoding; 0 means ``os.cpu_count()``."""
    sample_bytes: int = positive(100 << 20)
    """Corpus data: UTF-8 bytes of lines in the seeded sample the tokenizer is trained on (100 MiB)."""
    sample_read_bytes: int = at_least(2 << 30, 0)
    """Corpus data: input bytes read to draw that sample (whole units, evenly spaced); 0 = all."""

    def problems(self) -> list[str]:
        problems: list[str] = []
        if self.byte_fallback:
            needed = 4 + _N_BYTE_PIECES + len(self.extra_special_tokens) + 1
            if self.vocab_size < needed:
                problems.append(
                    f"tokenizer.vocab_size={self.vocab_size} is too small for tokenizer.byte_fallback=true "
                    f"(4 specials + 256 byte pieces + {len(self.extra_special_tokens)} extra tokens); "
                    f"use at least {needed}"
                )
        for key in ("pad_piece", "unk_piece"):
            piece = getattr(self, key)
            if not piece or any(ch.isspace() for ch in piece):
                problems.append(f"tokenizer.{key}={piece!r}: expected a non-empty string without whitespace")
        reserved = {self.pad_piece, self.unk_piece, BOS_PIECE, EOS_PIECE}
        return problems + _special_token_problems(self.extra_special_tokens, reserved)

    def with_task_tokens(self, special_tokens: tuple[str, ...], pieces: dict[str, str]) -> TokenizerConfig:
        """A copy that reserves a task's special tokens and spells pad/unk as the task wants."""
        extra = list(self.extra_special_tokens)
        extra += [token for token in special_tokens if token not in extra]
        return replace(self, extra_special_tokens=extra, **pieces)

    def resolved_threads(self) -> int:
        """The number of threads to use, with 0 resolved to the machine's CPU count."""
        return self.num_threads or os.cpu_count() or 1


def _special_token_problems(tokens: object, reserved: set[str]) -> list[str]:
    """Problems with ``extra_special_tokens``: each must be a distinct, non-empty, whitespace-free string."""
    key = "tokenizer.extra_special_tokens"
    if not isinstance(tokens, list):
        return [f"{key}={tokens!r} must be a list of strings"]
    problems: list[str] = []
    for token in tokens:
        if not isinstance(token, str) or not token:
            problems.append(f"{key}: {token!r} must be a non-empty string")
        elif any(ch.isspace() for ch in token) or token.startswith(WORD_START):
            # Whitespace becomes "▁" before matching, so such a token could never be found in text.
            problems.append(f"{key}: {token!r} must not contain whitespace or start with {WORD_START!r}")
        elif token in reserved:
            problems.append(f"{key}: {token!r} is already a built-in special token")
    duplicates = sorted({t for t in tokens if isinstance(t, str) and tokens.count(t) > 1})
    if duplicates:
        problems.append(f"{key}: duplicate tokens {duplicates}")
    return problems


class Tokenizer:
    """Thin wrapper over a trained SentencePieceProcessor."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path, num_threads: int = 0) -> None:
        self._sp = processor
        self.path = Path(path)
        self.num_threads = num_threads or os.cpu_count() or 1
        self.vocab_size: int = processor.get_piece_size()
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    @classmethod
    def load(cls, path: Path, num_threads: int = 0) -> Tokenizer:
        """Load a ``.model`` file; :class:`DataError` if it is missing, unreadable or has other specials."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer: {path} does not exist; expected a sentencepiece .model file")
        if (
            path.name == MODEL_FILE and (path.parent / META_FILE).is_file()
        ):  # lmexp's cache: check, never trust
            if problem := cached_model_problem(path):
                raise DataError(
                    f"tokenizer: the cached model {path} is damaged ({problem}); prepare the data again to "
                    f"rebuild it, or delete {path.parent}"
                )
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(model_file=str(path))
        except (OSError, RuntimeError) as err:
            reason = _one_line(err)
            raise DataError(f"tokenizer: {path} is not a sentencepiece model ({reason})") from None
        found = (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id())
        if found != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise DataError(
                f"tokenizer: {path} has special ids pad,unk,bos,eos={found}; expected (0, 1, 2, 3) "
                "as trained by lmexp"
            )
        return cls(processor, path, num_threads)

    def special_id(self, piece: str) -> int:
        """The id of an extra special token; raises :class:`ConfigError` if the vocabulary lacks it."""
        token_id = self._sp.piece_to_id(piece)
        if token_id == self.unk_id and piece != UNK_PIECE:
            raise ConfigError(
                f"tokenizer.extra_special_tokens: {piece!r} is not in the vocabulary of {self.path}; "
                "add it to tokenizer.extra_special_tokens and retrain"
            )
        return token_id

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no bos/eos), encoded by sentencepiece's thread pool."""
        return self._sp.encode(list(texts), num_threads=self.num_threads)

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Token ids of each text (no bos/eos) and the character span ``(start, end)`` of each piece in it.

        The spans are the ``begin``/``end`` of each piece in sentencepiece's ``SentencePieceText`` proto,
        converted to character offsets by sentencepiece itself (``out_type="offset_mapping"``; the
        installed sentencepiece 0.2.3 no longer offers immutable protos). They point into the ORIGINAL
        text, through normalisation: a ``"▁word"`` piece spans the whitespace before the word too;
        consecutive spans touch (``end == next start``) from the first non-whitespace character to the
        end of the last piece; the leading pieces of a character split into byte pieces have empty
        spans (``start == end``) and its last byte piece spans the character.
        """
        encoded = self._sp.encode(list(texts), out_type="offset_mapping", num_threads=self.num_threads)
        return [(list(row["ids"]), [tuple(span) for span in row["offsets"]]) for row in encoded]

    def decode(self, ids: list[int] | np.ndarray) -> str:
        """The text for ``ids``; control tokens (pad, bos, eos) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary piece of ``token_id``."""
        return self._sp.id_to_piece(int(token_id))

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"


HF_TOKENIZER_FILE = "tokenizer.json"  # what makes a directory a Hugging Face tokenizer


def load_tokenizer(path: Path | str, num_threads: int = 0) -> Any:
    """The tokenizer stored at ``path``, whatever its kind.

    A file is a sentencepiece ``.model`` trained by lmexp (:class:`Tokenizer`); a directory holding
    ``tokenizer.json`` is a Hugging Face tokenizer, loaded by ``HFTokenizer.load`` of
    :mod:`lmexp.data.text_tokenizer` (imported only then: it pulls in transformers). Both give what token
    preparation needs: ``encode``, ``eos_id``, ``pad_id``, ``vocab_size`` and ``path``.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / HF_TOKENIZER_FILE).is_file():
            raise DataError(
                f"tokenizer: {path} is a directory without {HF_TOKENIZER_FILE}; expected a sentencepiece "
                ".model file or a Hugging Face tokenizer directory"
            )
        from lmexp.data.text_tokenizer import HFTokenizer

        return HFTokenizer.load(path)
    return Tokenizer.load(path, num_threads)


def tokenizer_files(path: Path | str) -> list[Path]:
    """The files that make up the tokenizer at ``path`` (a ``.model`` file, or every file of a Hugging Face
    tokenizer directory), in a fixed order: their digest keys the caches built with it."""
    path = Path(path).expanduser()
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return [path]


def tokenizer_cache_dir(corpus_key: str, config: TokenizerConfig, cache_dir: Path) -> Path:
    """The cache directory for a tokenizer of ``corpus_key`` trained with ``config``."""
    key_config = asdict(config)
    del key_config["num_threads"]  # threads change speed, not the result we want to share across machines
    return Path(cache_dir) / "tokenizers" / stable_hash({"corpus": corpus_key, "config": key_config})


def train_or_load_tokenizer(
    documents: list[str], corpus_key: str, config: TokenizerConfig, cache_dir: Path
) -> Tokenizer:
    """Load the cached tokenizer for (``corpus_key``, ``config``), training and caching it first if needed.

    Concurrent callers serialise on a lock; the model file is moved into place last, so a reader that sees
    ``spm.model`` sees a finished tokenizer. A cached model that fails its check
    (:func:`cached_model_problem`: truncated, altered, its metadata lost) is rebuilt under the lock with a
    warning; when ``documents`` is empty (the caller expected the cache to hold it), it is removed and a
    :class:`DataError` says to run again.
    """
    directory = tokenizer_cache_dir(corpus_key, config, cache_dir)
    model_path = directory / MODEL_FILE
    threads = config.resolved_threads()
    if model_path.is_file() and cached_model_problem(model_path) is None:
        return Tokenizer.load(model_path, threads)
    with build_lock(directory):
        problem = cached_model_problem(model_path)  # another process may have built or repaired it meanwhile
        if problem is not None:
            if model_path.is_file():
                log.warning("tokenizer cache %s is damaged (%s); rebuilding it", model_path, problem)
                if not documents:
                    _discard(directory)
                    raise DataError(
                        f"tokenizer: the cached model {model_path} was damaged ({problem}) and has been "
                        "removed; run again to rebuild it"
                    )
            _build(documents, corpus_key, config, directory)
            log.info("built tokenizer %s", model_path)
    return Tokenizer.load(model_path, threads)


def cached_model_problem(model_path: Path) -> str | None:
    """Why the cached tokenizer model at ``model_path`` cannot be trusted, or None when it is whole.

    Its size and SHA-256 must be those recorded in ``meta.json`` when it was built; a model cached before
    lmexp recorded them must at least load.
    """
    try:
        data = Path(model_path).read_bytes()
        meta = json.loads((Path(model_path).parent / META_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError as missing:
        return f"{Path(str(missing.filename)).name} is missing"
    except (OSError, ValueError) as error:
        return f"{META_FILE} is unreadable ({type(error).__name__})"
    if isinstance(meta, dict) and "model" in meta:
        return fingerprint_problem(MODEL_FILE, data, meta["model"])
    try:  # cached before fingerprints were recorded
        spm.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, TypeError, ValueError) as error:
        return f"{MODEL_FILE} does not load ({_one_line(error)})"
    return None


def _discard(directory: Path) -> None:
    """Remove a damaged cached tokenizer (under its build lock): model first, so no reader takes it."""
    for name in (MODEL_FILE, META_FILE, VOCAB_FILE):
        (directory / name).unlink(missing_ok=True)


def _build(documents: list[str], corpus_key: str, config: TokenizerConfig, directory: Path) -> None:
    """Train into a temporary directory inside ``directory``, then move the files in, model last.

    Runs under the build lock, so any other ``.build-*`` directory there was left by a builder that was
    killed; it is removed first. A damaged model is removed before anything else is replaced.
    """
    for stale in directory.glob(".build-*"):
        shutil.rmtree(stale, ignore_errors=True)
    (directory / MODEL_FILE).unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=directory))
    try:
        n_lines = _train(documents, corpus_key, config, tmp / "spm")
        meta = {
            "corpus": corpus_key,
            "config": asdict(config),
            "n_training_lines": n_lines,
            "sentencepiece_version": spm.__version__,
            "model": fingerprint((tmp / MODEL_FILE).read_bytes()),
        }
        atomic_write_json(tmp / META_FILE, meta)
        for name in (VOCAB_FILE, META_FILE, MODEL_FILE):
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _train(documents: list[str], corpus_key: str, config: TokenizerConfig, prefix: Path) -> int:
    """Train sentencepiece on the lines of ``documents``, writing ``prefix``.model/.vocab; returns #lines."""
    n_lines = sum(1 for _ in _training_lines(documents))
    if n_lines == 0:
        raise DataError(f"tokenizer: corpus {corpus_key} has no non-empty lines to train on")
    spm.set_random_generator_seed(_TRAINING_SEED)
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=_training_lines(documents),
            model_prefix=str(prefix),
            model_type=config.kind,
            vocab_size=config.vocab_size,
            character_coverage=config.character_coverage,
            byte_fallback=config.byte_fallback,
            user_defined_symbols=list(config.extra_special_tokens),
            input_sentence_size=config.max_training_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            num_threads=config.resolved_threads(),
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_piece=config.pad_piece,
            unk_piece=config.unk_piece,
            bos_piece=BOS_PIECE,
            eos_piece=EOS_PIECE,
            add_dummy_prefix=True,
            minloglevel=2,  # training logs pages of progress to stderr; errors still raise
        )
    except RuntimeError as err:
        raise _training_error(err, config) from None
    return n_lines


def _training_lines(documents: list[str]) -> Iterator[str]:
    """Non-empty lines of every document, long lines cut at whitespace so sentencepiece keeps them."""
    for document in documents:
        for line in document.split("\n"):
            if not line.strip():
                continue
            while len(line) > _MAX_LINE_CHARS:
                cut = line.rfind(" ", 0, _MAX_LINE_CHARS)
                cut = cut if cut > 0 else _MAX_LINE_CHARS
                yield line[:cut]
                line = line[cut:]
            if line.strip():
                yield line


_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def _training_error(err: RuntimeError, config: TokenizerConfig) -> Exception:
    """Turn a sentencepiece training failure into a one-line user error."""
    message = str(err)
    if match := _TOO_HIGH.search(message):
        return ConfigError(
            f"tokenizer.vocab_size={config.vocab_size} is larger than this corpus supports "
            f"(at most {match.group(2)}); lower tokenizer.vocab_size"
        )
    if match := _TOO_SMALL.search(message):
        return ConfigError(
            f"tokenizer.vocab_size={config.vocab_size} is smaller than the {match.group(2)} pieces this "
            "corpus needs (specials, byte pieces and characters); raise tokenizer.vocab_size or lower "
            "tokenizer.character_coverage"
        )
    return DataError(f"tokenizer: sentencepiece training failed: {_one_line(err)}")


def _one_line(err: BaseException) -> str:
    """The exception's message without sentencepiece's ``INTERNAL: file.cc(123) [...]`` prefix."""
    text = " ".join(str(err).split())
    return re.sub(r"^\w+: \S+\(\d+\) \[.*?\] ", "", text) or type(err).__name__
