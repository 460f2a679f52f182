"""Content-addressed caches shared by concurrent processes.

Every cached artefact (generated corpus, tokenizer model, packed token file) lives in a directory named
by a hash of everything it depends on. It is built under a file lock, written to a temporary name and
renamed into place, so a concurrent reader sees either nothing or the finished file, never half of it.
A write that fails for lack of space, a size limit or permission raises one clear
:class:`~lmexp.errors.StorageError` and leaves the previous file whole. Files read back whole (the generated
corpus, the tokenizer model) record a :func:`fingerprint` at build time that is checked on every open
(:func:`fingerprint_problem`), so a damaged cache file is rebuilt rather than trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock

from lmexp.errors import StorageError, is_storage_failure

CACHE_FORMAT_VERSION = 1  # bump when the layout of any cached artefact changes


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short hex digest of a JSON-serialisable object, independent of dict key order."""
    payload = json.dumps({"v": CACHE_FORMAT_VERSION, "obj": obj}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def files_digest(paths: Sequence[Path], length: int = 16) -> str:
    """A digest of the names and contents of ``paths`` (in the given order); a directory stands for the files
    in it (sorted by name; hidden ones left out), e.g. a Hugging Face tokenizer's."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        files = (
            sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if path.is_dir()
            else [path]
        )
        for file in files:
            digest.update(str(file.name).encode() + b"\0")
            with open(file, "rb") as handle:
                for chunk in iter(lambda handle=handle: handle.read(1 << 20), b""):
                    digest.update(chunk)
            digest.update(b"\0")
    return digest.hexdigest()[:length]


@contextlib.contextmanager
def build_lock(directory: Path, timeout: float = -1) -> Iterator[None]:
    """Hold an exclusive, cross-process lock on ``directory`` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory) + ".lock", timeout=timeout):
        yield


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success rename it to ``final``, on failure delete it.

    ``final`` is not touched before the rename, so when anything fails its previous version stays whole. A
    failure to create, write or rename the file for lack of space, a file-size limit or permission raises
    :class:`~lmexp.errors.StorageError` naming ``final`` and the cause.
    """
    final = Path(final)
    tmp: Path | None = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        os.replace(tmp, final)
    except OSError as error:
        if is_storage_failure(error) and _concerns(error, final):
            raise StorageError(final, error) from error
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _concerns(error: OSError, final: Path) -> bool:
    """Whether a failed call was about writing ``final`` (its temporary file, its directory or an ancestor
    of it), not about some other file the caller happened to touch meanwhile."""
    if error.filename is None:  # a write() or close() on the open temporary file
        return True
    name = Path(os.fsdecode(error.filename))
    return name.parent == final.parent or final.is_relative_to(name)


def atomic_write_text(final: Path, text: str) -> None:
    """Write ``text`` to ``final`` atomically."""
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(final: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``final`` atomically."""
    atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------ integrity
def fingerprint(data: bytes) -> dict[str, Any]:
    """Size and SHA-256 of a cache file's contents, recorded when it is built (about 2 ms per MB)."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def fingerprint_problem(name: str, data: bytes, recorded: Any) -> str | None:
    """What is wrong with the contents ``data`` of the file ``name`` compared with the fingerprint recorded at
    build time, or None when they agree."""
    if not isinstance(recorded, dict) or not {"bytes", "sha256"} <= set(recorded):
        return f"{name} has no recorded size and checksum"
    if len(data) != recorded["bytes"]:
        return f"{name} is {len(data)} bytes, expected {recorded['bytes']} (truncated or overwritten)"
    if hashlib.sha256(data).hexdigest() != recorded["sha256"]:
        return f"{name} does not match its recorded SHA-256 (altered)"
    return None
