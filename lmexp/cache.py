"""Content-addressed caches shared by concurrent processes.

Every cached artefact (generated corpus, tokenizer model, packed token file) lives in a directory named
by a hash of everything it depends on. It is built under a file lock, written to a temporary name and
renamed into place, so a concurrent reader sees either nothing or the finished file, never half of it.
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
    """Yield a temporary path next to ``final``; on success rename it to ``final``, on failure delete it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(final: Path, text: str) -> None:
    """Write ``text`` to ``final`` atomically."""
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(final: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``final`` atomically."""
    atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=True) + "\n")
