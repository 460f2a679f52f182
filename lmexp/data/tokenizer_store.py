"""A run's tokenizer as the cache holds it and as checkpoints carry it, sentencepiece or Hugging Face.

A sentencepiece tokenizer is one ``.model`` file; a checkpoint stores its bytes as ``tokenizer_model``. A
Hugging Face tokenizer is a directory of files (what ``save_pretrained`` writes); a checkpoint stores them as
``tokenizer_files`` (``{file name: bytes}``). Either is written back into the cache, content-addressed, to be
loaded again:

    tokenizers/checkpoint-<hash>/spm.model     a checkpoint's sentencepiece model
    hf-tokenizers/<hash of its files>/          a Hugging Face tokenizer (a model's own, or a checkpoint's)

Token files are keyed by the tokenizer's files (:func:`lmexp.cache.files_digest` reads a directory's files),
so a model's tokenizer packs its corpus once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lmexp.cache import atomic_path, build_lock, files_digest
from lmexp.data.text_tokenizer import HFTokenizer
from lmexp.data.tokenizer import MODEL_FILE, Tokenizer
from lmexp.errors import CheckpointError, ConfigError

HF_TOKENIZERS = "hf-tokenizers"
_COMPLETE = ".complete"  # written last into a cached tokenizer directory (hidden: not one of its files)


# ------------------------------------------------------------------------------------------------ cache
def cache_tokenizer_model(model_bytes: bytes, cache_dir: Path) -> Path:
    """Write a checkpoint's sentencepiece model into the cache (by content hash); return its path."""
    digest = hashlib.sha256(model_bytes).hexdigest()[:16]
    directory = Path(cache_dir).expanduser() / "tokenizers" / f"checkpoint-{digest}"
    path = directory / MODEL_FILE
    with build_lock(directory):
        if not path.is_file():
            with atomic_path(path) as tmp:
                tmp.write_bytes(model_bytes)
    return path


def cache_hf_files(write: Any, cache_dir: Path) -> Path:
    """The cache directory of a Hugging Face tokenizer whose files ``write(directory)`` puts into a
    directory; named by the hash of those files, filled once (under a lock, marked complete last)."""
    root = Path(cache_dir).expanduser() / HF_TOKENIZERS
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        write(staging)
        final = root / files_digest([staging])
        with build_lock(final):
            if not (final / _COMPLETE).exists():
                for file in sorted(staging.iterdir()):
                    os.replace(file, final / file.name)
                (final / _COMPLETE).touch()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def save_hf_tokenizer(
    name_or_path: str, cache_dir: Path, revision: str | None = None, trust_remote_code: bool = False
) -> Path:
    """A model's own tokenizer (``AutoTokenizer`` of a local directory or a hub id), saved into the cache;
    returns its directory. One-line ConfigError naming ``model.name_or_path`` when it has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        reason = " ".join(str(error).split())[:200]
        raise ConfigError(
            f"model.name_or_path={name_or_path} has no tokenizer transformers can load (expected "
            f"tokenizer.json or the tokenizer files of its kind next to config.json): {reason}"
        ) from None
    HFTokenizer(tokenizer)  # a fast tokenizer with an eos token, or one line saying what it lacks
    return cache_hf_files(tokenizer.save_pretrained, cache_dir)


# ------------------------------------------------------------------------------------------ checkpoints
def checkpoint_entries(tokenizer: Any) -> dict[str, Any]:
    """What a checkpoint keeps of the run's tokenizer: ``tokenizer_model`` (the sentencepiece model's bytes)
    or ``tokenizer_files`` (a Hugging Face tokenizer's files), as uint8 tensors."""
    if isinstance(tokenizer, HFTokenizer):
        return {"tokenizer_files": {file.name: _tensor(file.read_bytes()) for file in tokenizer.files}}
    return {"tokenizer_model": _tensor(Path(tokenizer.path).read_bytes())}


def _tensor(data: bytes) -> Any:
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def saved_tokenizer(entries: dict[str, Any]) -> dict[str, bytes]:
    """A checkpoint's tokenizer as ``{file name: bytes}`` (a sentencepiece model is one file)."""
    if "tokenizer_files" in entries:
        return {name: value.numpy().tobytes() for name, value in entries["tokenizer_files"].items()}
    if "tokenizer_model" in entries:
        return {MODEL_FILE: entries["tokenizer_model"].numpy().tobytes()}
    return {}


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """A loaded tokenizer as ``{file name: bytes}``, comparable with :func:`saved_tokenizer`."""
    if isinstance(tokenizer, HFTokenizer):
        return {file.name: file.read_bytes() for file in tokenizer.files}
    return {MODEL_FILE: Path(tokenizer.path).read_bytes()}


def as_given(tokenizer: Any) -> dict[str, Any]:
    """A loaded tokenizer as data-module inputs (DataContext's ``tokenizer_model`` / ``tokenizer_dir``)."""
    if isinstance(tokenizer, HFTokenizer):
        return {"tokenizer_model": None, "tokenizer_dir": tokenizer.path}
    return {"tokenizer_model": Path(tokenizer.path).read_bytes(), "tokenizer_dir": None}


def restore_tokenizer(entries: dict[str, Any], cache_dir: Path, key: str = "ckpt_path") -> Any:
    """The tokenizer a checkpoint carries, written into the cache and loaded."""
    source = tokenizer_source(entries, cache_dir, key)
    if source["tokenizer_dir"] is not None:
        return HFTokenizer.load(source["tokenizer_dir"])
    return Tokenizer.load(cache_tokenizer_model(source["tokenizer_model"], cache_dir))


def tokenizer_source(entries: dict[str, Any], cache_dir: Path, key: str = "ckpt_path") -> dict[str, Any]:
    """A checkpoint's tokenizer as data-module inputs: ``{"tokenizer_model": bytes | None, "tokenizer_dir":
    Path | None}`` (a Hugging Face tokenizer is written into the cache first)."""
    if "tokenizer_files" in entries:
        files = saved_tokenizer(entries)

        def write(directory: Path) -> None:
            for name, data in files.items():
                (directory / name).write_bytes(data)

        return {"tokenizer_model": None, "tokenizer_dir": cache_hf_files(write, cache_dir)}
    if "tokenizer_model" in entries:
        return {"tokenizer_model": entries["tokenizer_model"].numpy().tobytes(), "tokenizer_dir": None}
    raise CheckpointError(f"{key}: the checkpoint carries no tokenizer (tokenizer_model or tokenizer_files)")
