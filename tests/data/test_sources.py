"""Tests for the streaming readers (lmexp.data.sources): every format, every unit kind, every bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmexp.data.sources import SourceSpec, iter_documents, plan_units, read_unit
from lmexp.errors import ConfigError, DataError
from tests.data.engine_helpers import make_documents, write_jsonl, write_txt

DOCUMENTS = make_documents(200)


def documents(spec: SourceSpec, unit_bytes: int = 1 << 20) -> list[str]:
    return list(iter_documents(spec, unit_bytes))


def expect_error(spec: SourceSpec, match: str, unit_bytes: int = 1 << 20) -> str:
    """Reading ``spec`` raises a one-line DataError naming its config key and matching ``match``."""
    with pytest.raises(DataError, match=match) as info:
        documents(spec, unit_bytes)
    message = str(info.value)
    assert "\n" not in message and message.startswith(spec.key), message
    return message


# ------------------------------------------------------------------------------- text formats
def test_txt_documents_in_one_unit_and_in_many(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes(
        "\ufeffa\r\nb  \r\n\r\n \t\nc\rd\r\re\n\n\n  indented\nline\n\n".encode() + write_txt_bytes(DOCUMENTS)
    )
    # A leading BOM goes, \r\n and \r are line breaks, runs of blank (whitespace-only) lines separate
    # documents, and a document keeps its inner newlines and leading spaces, not its trailing ones.
    expected = ["a\nb", "c\nd", "e", "  indented\nline", *DOCUMENTS]
    spec = SourceSpec("web", str(path))
    assert documents(spec) == expected
    units = plan_units(spec, unit_bytes=500)
    assert len(units) > 10 and units[0].start == 0 and units[-1].stop == path.stat().st_size
    assert all(a.stop == b.start for a, b in zip(units, units[1:], strict=False))
    assert [d for u in units for d in read_unit(u, spec)] == expected  # cuts fall between documents


def write_txt_bytes(docs: list[str]) -> bytes:
    return ("\n\n".join(docs) + "\n").encode()


def test_a_file_without_blank_lines_is_one_unit(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_text("word " * 20_000 + "\n" + "more words\n" * 2000)
    assert len(plan_units(SourceSpec("o", str(path)), unit_bytes=100)) == 1  # no cut point: no split


def test_jsonl_in_many_units_and_a_custom_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", DOCUMENTS, field="body")
    with path.open("a") as handle:
        handle.write("\n" + json.dumps({"body": "  "}) + "\n")  # blank lines and blank texts are skipped
    spec = SourceSpec("j", str(path), text_field="body")
    assert documents(spec, unit_bytes=300) == DOCUMENTS
    assert len(plan_units(spec, 300)) > 10


@pytest.mark.parametrize("compression", ["gz", "zst"])
@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_compressed_files_read_like_plain_ones(tmp_path: Path, fmt: str, compression: str) -> None:
    plain = (
        write_txt(tmp_path / "c.txt", DOCUMENTS)
        if fmt == "txt"
        else write_jsonl(tmp_path / "c.jsonl", DOCUMENTS)
    )
    data = plain.read_bytes()
    packed = gzip.compress(data) if compression == "gz" else zstandard.ZstdCompressor().compress(data)
    path = tmp_path / f"c.{fmt}.{compression}"
    path.write_bytes(packed)
    spec = SourceSpec("z", str(path))
    units = plan_units(spec, unit_bytes=100)
    assert len(units) == 1 and units[0].compression == compression  # a stream cannot be entered mid-way
    assert documents(spec) == DOCUMENTS


def test_zstd_file_of_several_frames(tmp_path: Path) -> None:
    compressor = zstandard.ZstdCompressor()
    path = tmp_path / "c.txt.zst"
    path.write_bytes(
        compressor.compress(write_txt_bytes(DOCUMENTS[:50])) + compressor.compress(b"\n\nlast doc\n")
    )
    assert documents(SourceSpec("z", str(path))) == [*DOCUMENTS[:50], "last doc"]


def test_directory_and_glob_with_mixed_formats(tmp_path: Path) -> None:
    write_txt(tmp_path / "a.txt", DOCUMENTS[:10])
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "b.jsonl", DOCUMENTS[10:20])
    (tmp_path / "sub" / "c.jsonl.gz").write_bytes(
        gzip.compress(write_jsonl(tmp_path / "x", DOCUMENTS[20:30]).read_bytes())
    )
    (tmp_path / "x").unlink()
    (tmp_path / "notes.md").write_text("ignored")
    assert documents(SourceSpec("d", str(tmp_path))) == DOCUMENTS[:30]
    assert documents(SourceSpec("g", str(tmp_path / "**" / "*.jsonl*"))) == DOCUMENTS[10:30]


# ----------------------------------------------------------------------------------- parquet
def test_parquet_by_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    table = pa.table({"id": list(range(len(DOCUMENTS))), "content": DOCUMENTS})
    pq.write_table(table, path, row_group_size=30)
    spec = SourceSpec("p", str(path), text_field="content")
    units = plan_units(spec, unit_bytes=1)  # one unit per row group
    assert [(u.start, u.stop) for u in units] == [(g, g + 1) for g in range(7)]
    assert [d for u in units for d in read_unit(u, spec)] == DOCUMENTS
    assert len(plan_units(spec, unit_bytes=1 << 30)) == 1  # small row groups merge into one unit


def test_parquet_nulls_and_blank_texts_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["one", None, "  ", "two"]}), path)
    assert documents(SourceSpec("p", str(path))) == ["one", "two"]


# ---------------------------------------------------------------------------------- datasets
@pytest.fixture(scope="module")
def hf_dataset():
    datasets = pytest.importorskip("datasets")
    return datasets.Dataset.from_dict({"text": DOCUMENTS, "n": list(range(len(DOCUMENTS)))})


def test_save_to_disk_directory_in_row_ranges(tmp_path: Path, hf_dataset) -> None:
    hf_dataset.save_to_disk(str(tmp_path / "ds"))
    spec = SourceSpec("hf", str(tmp_path / "ds"))  # format auto-detected from state.json
    units = plan_units(spec, unit_bytes=2000)
    assert len(units) > 3 and {u.kind for u in units} == {"hf_rows"}
    assert documents(spec, unit_bytes=2000) == DOCUMENTS


def test_dataset_dict_split_and_streaming(tmp_path: Path, hf_dataset) -> None:
    import datasets

    both = datasets.DatasetDict({"train": hf_dataset, "validation": hf_dataset.select(range(5))})
    both.save_to_disk(str(tmp_path / "dd"))
    assert documents(SourceSpec("v", str(tmp_path / "dd"), split="validation")) == DOCUMENTS[:5]
    streamed = SourceSpec("s", str(tmp_path / "dd"), streaming=True)
    assert {u.kind for u in plan_units(streamed, 1)} == {"hf_shard"}
    assert documents(streamed) == DOCUMENTS


def test_load_dataset_with_local_data_files(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    (tmp_path / "data").mkdir()
    files = [
        write_jsonl(tmp_path / "data" / f"part{i}.jsonl", DOCUMENTS[i * 100 : i * 100 + 100])
        for i in range(2)
    ]
    cache = str(tmp_path / "hf-cache")
    spec = SourceSpec("lj", "json", format="hf", data_files=[str(f) for f in files], hf_cache_dir=cache)
    assert documents(spec) == DOCUMENTS
    streamed = SourceSpec("ls", "json", format="hf", data_files=[str(f) for f in files], streaming=True)
    assert len(plan_units(streamed, 1)) == 2  # one unit per file
    assert documents(streamed) == DOCUMENTS
    directory = SourceSpec(
        "ld", str(tmp_path / "data"), format="hf", hf_cache_dir=cache
    )  # a directory of data files
    assert sorted(documents(directory)) == sorted(DOCUMENTS)


# -------------------------------------------------------------------------------- bad inputs
def test_truncated_gzip(tmp_path: Path) -> None:
    packed = gzip.compress(write_txt_bytes(DOCUMENTS))
    (tmp_path / "c.txt.gz").write_bytes(packed[: len(packed) // 2])
    expect_error(
        SourceSpec("t", str(tmp_path / "c.txt.gz")), r"c\.txt\.gz: is truncated \(gzip stream ends early"
    )


def test_truncated_and_corrupt_zstd(tmp_path: Path) -> None:
    packed = zstandard.ZstdCompressor().compress(write_txt_bytes(DOCUMENTS * 20))
    (tmp_path / "c.txt.zst").write_bytes(packed[: len(packed) // 2])
    expect_error(SourceSpec("t", str(tmp_path / "c.txt.zst")), r"c\.txt\.zst: is truncated \(zstd")
    (tmp_path / "d.txt.zst").write_bytes(b"not zstd at all" * 10)
    expect_error(
        SourceSpec("t", str(tmp_path / "d.txt.zst")), r"d\.txt\.zst: cannot be read .*expected a valid zstd"
    )


def test_corrupt_and_truncated_parquet(tmp_path: Path) -> None:
    (tmp_path / "junk.parquet").write_bytes(b"this is not parquet" * 10)
    expect_error(
        SourceSpec("p", str(tmp_path / "junk.parquet")), r"junk\.parquet is not a readable Parquet file"
    )
    pq.write_table(pa.table({"text": DOCUMENTS}), tmp_path / "t.parquet")
    data = (tmp_path / "t.parquet").read_bytes()
    (tmp_path / "t.parquet").write_bytes(data[: len(data) - 100])
    expect_error(SourceSpec("p", str(tmp_path / "t.parquet")), r"t\.parquet is not a readable Parquet file")


def test_parquet_row_group_damage_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": DOCUMENTS}), path, row_group_size=70, compression="snappy")
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + 40 : start + 140] = b"\xff" * 100  # inside the second (of three) row group's pages
    path.write_bytes(bytes(data))
    expect_error(SourceSpec("p", str(path)), r"c\.parquet row group 1 is damaged")


def test_parquet_without_the_text_column_names_its_columns(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), tmp_path / "c.parquet")
    message = expect_error(SourceSpec("p", str(tmp_path / "c.parquet")), "has no column 'text'")
    assert "(columns: body, id)" in message and "text_field" in message
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    expect_error(SourceSpec("p", str(tmp_path / "n.parquet")), "column 'text' is int64; expected strings")


@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.txt", b""), ("blank.txt", b" \n\t\n\n"), ("blank.jsonl", b'{"text": " "}\n\n')],
)
def test_a_source_without_documents(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    expect_error(SourceSpec("e", str(tmp_path / name)), f"{name} .*contains no documents")


def test_a_parquet_file_without_documents(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": pa.array([None, ""], type=pa.string())}), tmp_path / "c.parquet")
    expect_error(SourceSpec("e", str(tmp_path / "c.parquet")), r"row groups 0-0\) contains no documents")


def test_a_datasets_path_that_does_not_exist(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    expect_error(SourceSpec("h", str(tmp_path / "nope"), format="hf"), "nope does not exist")
    spec = SourceSpec("h", "json", format="hf", data_files=str(tmp_path / "missing*.jsonl"))
    expect_error(spec, r"data_files: .*missing\*\.jsonl matches no files")


def test_a_dataset_without_the_split_or_column(tmp_path: Path, hf_dataset) -> None:
    import datasets

    datasets.DatasetDict({"train": hf_dataset}).save_to_disk(str(tmp_path / "dd"))
    expect_error(
        SourceSpec("h", str(tmp_path / "dd"), split="test"), "has splits train; expected one of them"
    )
    message = expect_error(SourceSpec("h", str(tmp_path / "dd"), text_field="body"), "has no column 'body'")
    assert "(columns: text, n)" in message


@pytest.mark.parametrize("weight", [0, -1.0, float("nan"), "x", True])
def test_a_mixture_weight_must_be_positive(weight) -> None:
    with pytest.raises(ConfigError, match=r"data\.sources\.web\.weight=.*expected a number > 0"):
        SourceSpec("web", "x.txt", weight=weight).validate()


def test_binary_and_non_utf8_files_name_the_line(tmp_path: Path) -> None:
    (tmp_path / "bin.txt").write_bytes(b"text\n\x00\x01\x02\n")
    expect_error(SourceSpec("b", str(tmp_path / "bin.txt")), r"bin\.txt line 2: looks binary")
    body = write_txt_bytes(DOCUMENTS)
    (tmp_path / "latin.txt").write_bytes(body + "\n\ncaf\xe9\n".encode("latin-1"))
    line = body.count(b"\n") + 3
    message = expect_error(
        SourceSpec("b", str(tmp_path / "latin.txt")),
        rf"latin\.txt line {line}: is not valid UTF-8 \(byte 0xe9",
        400,
    )
    assert (
        f"at byte offset {len(body) + 5}" in message
    )  # named in the last of many units, counted from the file start


def test_malformed_json_lines_name_the_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", DOCUMENTS)
    with path.open("a") as handle:
        handle.write('{"text": "ok"}\n{not json\n')
    expect_error(
        SourceSpec("j", str(path)), rf"c\.jsonl line {len(DOCUMENTS) + 2}: malformed JSON", unit_bytes=500
    )
    cases = [("[1, 2]", "expected a JSON object, got list"), ('{"txt": "x"}', "has no field 'text'"),
             ('{"text": 5}', "field 'text' is int; expected a string")]  # fmt: skip
    for line, match in cases:
        path.write_text(line + "\n")
        expect_error(SourceSpec("j", str(path)), f"c.jsonl line 1: {match}")


def test_paths_that_match_nothing_and_unknown_extensions(tmp_path: Path) -> None:
    expect_error(SourceSpec("m", str(tmp_path / "missing.txt")), "missing.txt does not exist")
    expect_error(SourceSpec("m", str(tmp_path / "*.jsonl")), r"glob .*\*\.jsonl matches no files")
    (tmp_path / "c.csv").write_text("a,b\n")
    expect_error(SourceSpec("m", str(tmp_path / "c.csv")), "unsupported extension '.csv'")
    (tmp_path / "d").mkdir()
    expect_error(SourceSpec("m", str(tmp_path / "d")), "contains no .txt, .jsonl, .parquet")


def test_spec_problems_are_listed_with_their_keys() -> None:
    with pytest.raises(ConfigError) as info:
        SourceSpec("a/b", "", format="csv", assign_split="dev").validate()
    message = str(info.value)
    for key in ("name=", "path=", "format=", "assign_split="):
        assert f"data.sources.a/b.{key}" in message
