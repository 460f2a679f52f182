"""Reading user corpora: plain-text files of blank-line-separated documents and JSON-lines files.

Every problem a user can fix (a missing file, a binary or non-UTF-8 file, a malformed JSON line) becomes
one :class:`~lmexp.errors.DataError` line that names the config key, the file and what was expected.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

from lmexp.errors import DataError

SUPPORTED_SUFFIXES = (".txt", ".jsonl")
_BINARY_PROBE_BYTES = 8192  # a NUL byte this early means the file is not text
_GLOB_CHARS = set("*?[")


def resolve_paths(spec: str | list[str], key: str) -> list[Path]:
    """Expand ``spec`` (a file, a directory, a glob, or a list of those) into a sorted list of files.

    Directories are searched recursively for ``*.txt`` and ``*.jsonl``. Raises :class:`DataError` naming
    ``key`` (e.g. ``"data.path"``) when an entry matches nothing.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise DataError(f"{key}: is empty; expected a file, a directory or a glob")
    found: set[Path] = set()
    for entry in specs:
        if not isinstance(entry, str) or not entry.strip():
            raise DataError(f"{key}: {entry!r} is not a path; expected a file, a directory or a glob")
        found.update(_resolve_one(entry, key))
    return sorted(found)


def _resolve_one(entry: str, key: str) -> list[Path]:
    """The files one spec entry stands for; never empty."""
    expanded = str(Path(entry).expanduser())
    if _GLOB_CHARS & set(expanded):
        matches = [Path(m).resolve() for m in glob.glob(expanded, recursive=True) if Path(m).is_file()]
        if not matches:
            raise DataError(f"{key}: glob {entry} matches no files")
        return matches
    path = Path(expanded)
    if path.is_file():
        return [path.resolve()]
    if path.is_dir():
        matches = [p.resolve() for p in path.rglob("*") if p.is_file() and p.suffix in SUPPORTED_SUFFIXES]
        if not matches:
            supported = ", ".join(f"*{s}" for s in SUPPORTED_SUFFIXES)
            raise DataError(f"{key}: directory {path} contains no {supported} files")
        return matches
    raise DataError(f"{key}: {path} does not exist; expected a file, a directory or a glob")


def read_documents(paths: list[Path], key: str, text_field: str = "text") -> list[str]:
    """Read every document from ``paths`` in order.

    ``.txt`` files hold documents separated by one or more blank lines; ``.jsonl`` files hold one JSON
    object per line whose string field ``text_field`` is the document.
    """
    documents: list[str] = []
    for path in paths:
        documents.extend(_read_file(Path(path), key, text_field))
    return documents


def _read_file(path: Path, key: str, text_field: str) -> list[str]:
    """The documents of one file; raises :class:`DataError` if it has none."""
    if path.suffix not in SUPPORTED_SUFFIXES:
        supported = ", ".join(SUPPORTED_SUFFIXES)
        suffix = path.suffix or "(none)"
        raise DataError(f"{key}: {path} has unsupported extension {suffix!r}; expected {supported}")
    text = _read_text(path, key)
    documents = _split_jsonl(text, path, key, text_field) if path.suffix == ".jsonl" else _split_txt(text)
    if not documents:
        raise DataError(f"{key}: {path} contains no documents; expected non-empty text")
    return documents


def _read_text(path: Path, key: str) -> str:
    """The file decoded as UTF-8 with normalised newlines, or a one-line error saying why it is not text."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{key}: {path} does not exist") from None
    except OSError as err:
        raise DataError(f"{key}: {path} cannot be read ({err.strerror}); expected a readable file") from None
    if b"\0" in raw[:_BINARY_PROBE_BYTES]:
        raise DataError(f"{key}: {path} looks binary (contains NUL bytes); expected UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        byte = raw[err.start]
        raise DataError(
            f"{key}: {path} is not valid UTF-8 (byte 0x{byte:02x} at offset {err.start}); expected UTF-8 text"
        ) from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def _split_txt(text: str) -> list[str]:
    """Split on runs of blank (whitespace-only) lines; lines inside a document keep their newlines."""
    documents: list[str] = []
    current: list[str] = []
    for line in text.split("\n"):
        if line.strip():
            current.append(line)
        elif current:
            documents.append("\n".join(current).rstrip())
            current = []
    if current:
        documents.append("\n".join(current).rstrip())
    return documents


def _split_jsonl(text: str, path: Path, key: str, text_field: str) -> list[str]:
    """One document per non-blank line; documents that are only whitespace are dropped."""
    documents: list[str] = []
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{key}: {path} line {line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if text_field not in record:
            raise DataError(f"{where}: has no field {text_field!r}; expected a string field {text_field!r}")
        value = record[text_field]
        if not isinstance(value, str):
            raise DataError(f"{where}: field {text_field!r} is {type(value).__name__}; expected a string")
        if value.strip():
            documents.append(value)
    return documents
