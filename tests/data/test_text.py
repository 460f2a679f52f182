"""Tests for reading user corpora (lmexp.data.text)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmexp.data.text import read_documents, resolve_paths
from lmexp.errors import DataError

KEY = "data.path"


def read_one(path: Path, **kwargs) -> list[str]:
    return read_documents([path], KEY, **kwargs)


def expect_error(match: str, func, *args, **kwargs) -> str:
    """Call ``func`` expecting a one-line DataError that names data.path and matches ``match``."""
    with pytest.raises(DataError, match=match) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(KEY)
    return message


def test_txt_documents_split_on_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("\n  \nfirst line\nsecond line  \n\n\n \t \nthird doc\n  indented\n\nlast   \n\n")
    assert read_one(path) == ["first line\nsecond line", "third doc\n  indented", "last"]


def test_txt_windows_newlines_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes("\ufeffa\r\nb\r\n\r\nc\r\n".encode())
    assert read_one(path) == ["a\nb", "c"]


def test_jsonl_documents(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": "one doc", "id": 1}), "", "  ", json.dumps({"text": "two\ndoc"})]
    path.write_text("\n".join(lines) + "\n")
    assert read_one(path) == ["one doc", "two\ndoc"]


def test_jsonl_custom_field(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"body": "hello"}) + "\n")
    assert read_one(path, text_field="body") == ["hello"]


@pytest.mark.parametrize(
    ("bad_line", "match"),
    [
        ("{not json", "line 3: malformed JSON"),
        (json.dumps({"txt": "x"}), "line 3: has no field 'text'"),
        (json.dumps({"text": 5}), "line 3: field 'text' is int; expected a string"),
        (json.dumps(["text"]), "line 3: expected a JSON object"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, bad_line: str, match: str) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join([json.dumps({"text": "ok"}), "", bad_line]) + "\n")
    message = expect_error(match, read_one, path)
    assert str(path) in message


def test_missing_file(tmp_path: Path) -> None:
    expect_error("does not exist", read_one, tmp_path / "nope.txt")


@pytest.mark.parametrize("content", ["", "\n \n\t\n"])
def test_empty_txt_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.txt"
    path.write_text(content)
    expect_error("contains no documents", read_one, path)


def test_empty_jsonl_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"text": "  "}) + "\n\n")
    expect_error("contains no documents", read_one, path)


def test_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "model.txt"
    path.write_bytes(b"PK\x03\x04\x00\x00binary stuff")
    expect_error("looks binary", read_one, path)


def test_non_utf8_gives_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"hello world\xff more")
    expected = r"is not valid UTF-8 \(byte 0xff at offset 11\); expected UTF-8 text"
    message = expect_error(expected, read_one, path)
    assert str(path) in message


def test_unsupported_extension_lists_supported(tmp_path: Path) -> None:
    path = tmp_path / "corpus.csv"
    path.write_text("a,b\n")
    expect_error(r"unsupported extension '\.csv'; expected \.txt, \.jsonl", read_one, path)


def test_documents_keep_file_order(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("bee\n\nbee two")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "ay"}))
    paths = [tmp_path / "b.txt", tmp_path / "a.jsonl"]
    assert read_documents(paths, KEY) == ["bee", "bee two", "ay"]


def make_tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "b.txt").write_text("b")
    (root / "a.jsonl").write_text(json.dumps({"text": "a"}))
    (root / "sub" / "c.txt").write_text("c")
    (root / "sub" / "deeper" / "d.jsonl").write_text(json.dumps({"text": "d"}))
    (root / "sub" / "notes.md").write_text("ignored")


def test_resolve_directory_recursively(tmp_path: Path) -> None:
    make_tree(tmp_path)
    paths = resolve_paths(str(tmp_path), KEY)
    names = [p.relative_to(tmp_path.resolve()).as_posix() for p in paths]
    assert names == ["a.jsonl", "b.txt", "sub/c.txt", "sub/deeper/d.jsonl"]
    assert read_documents(paths, KEY) == ["a", "b", "c", "d"]


def test_resolve_glob_and_list(tmp_path: Path) -> None:
    make_tree(tmp_path)
    assert [p.name for p in resolve_paths(str(tmp_path / "**" / "*.txt"), KEY)] == ["b.txt", "c.txt"]
    specs = [str(tmp_path / "sub" / "c.txt"), str(tmp_path / "*.txt"), str(tmp_path / "b.txt")]
    both = resolve_paths(specs, KEY)
    assert [p.name for p in both] == ["b.txt", "c.txt"]  # sorted, duplicates dropped


def test_resolve_errors(tmp_path: Path) -> None:
    expect_error("does not exist", resolve_paths, str(tmp_path / "missing.txt"), KEY)
    expect_error("matches no files", resolve_paths, str(tmp_path / "*.txt"), KEY)
    (tmp_path / "only.md").write_text("x")
    expect_error(r"contains no \*\.txt, \*\.jsonl files", resolve_paths, str(tmp_path), KEY)
    expect_error("is empty", resolve_paths, [], KEY)
