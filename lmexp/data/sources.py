"""Streaming corpus readers: documents are yielded one at a time from files or Hugging Face datasets.

A source (:class:`SourceSpec`) is cut into *units of work* (:class:`Unit`) by :func:`plan_units`, and
:func:`read_unit` yields the documents of one unit lazily, so no reader ever holds a corpus, a file, or even
a whole unit in memory. Units are what parallel preparation distributes: worker processes, DDP ranks,
SLURM nodes or array tasks each take units, and together they read every document exactly once.

=============================  =================================================================
input                          unit of work
=============================  =================================================================
``.txt`` / ``.jsonl``          a byte range of the file, cut at a document (``.txt``) or line
                               (``.jsonl``) boundary, so a big file is read by many workers
``.txt.gz`` / ``.jsonl.zst``   the whole file (a compressed stream cannot be entered mid-way)
``.parquet``                   a run of consecutive row groups
``datasets`` (Arrow on disk)   a range of rows (``save_to_disk`` directories, ``load_dataset``)
``datasets`` streaming         one of the dataset's shards (``IterableDataset.shard``)
=============================  =================================================================

Document rules: ``.txt`` documents are separated by one or more blank
(whitespace-only) lines, lines inside a document keep their newlines, the document is right-stripped;
``\\r\\n`` and ``\\r`` become ``\\n`` and a leading byte-order mark is dropped. ``.jsonl`` and tabular
sources yield the ``text_field`` string of each record; whitespace-only (or null) texts are skipped.

Every problem a user can fix becomes one :class:`~lmexp.errors.DataError` line that names the source's
config key, the file (with line, byte offset or row group) and what was expected.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from lmexp.errors import ConfigError, DataError

FORMATS = ("auto", "txt", "jsonl", "parquet", "hf")
COMPRESSIONS = {".gz": "gz", ".zst": "zst"}
FILE_FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
# Markers of a directory written by ``datasets``' save_to_disk (a Dataset, or a DatasetDict).
HF_DISK_MARKERS = ("state.json", "dataset_dict.json")
# ``load_dataset`` builders that read local files named by ``data_files`` and never need the network.
HF_PACKAGED_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas", "webdataset", "xml")
_GLOB_CHARS = set("*?[")
_READ_BUFFER = 1 << 20  # bytes read from a file at a time
_BATCH_ROWS = 1024  # rows per Arrow record batch read from Parquet or a dataset


@dataclass
class SourceSpec:
    """One corpus: where its documents are, how to read them, and its weight in a mixture."""

    name: str = "default"
    """Short name of the source; per-source metrics are logged as ``val/<name>/loss``."""
    path: str | list[str] = ""
    """Files, directories (searched recursively) or globs; or, with ``format=hf``, what
    ``datasets.load_dataset`` takes (a builder such as ``json``, a local directory, a Hub id) or a directory
    written by ``save_to_disk``."""
    format: str = "auto"
    """``auto`` (by file suffix; a ``save_to_disk`` directory is ``hf``), ``txt``, ``jsonl``, ``parquet``
    or ``hf``. An explicit file format applies to every file; ``.gz``/``.zst`` are still decompressed."""
    text_field: str = "text"
    """The field (``.jsonl``) or column (Parquet, ``datasets``) holding the document text."""
    hf_name: str | None = None
    """``datasets``: the configuration name (``load_dataset``'s ``name``)."""
    split: str = "train"
    """``datasets``: the split to read (of a ``DatasetDict`` or of ``load_dataset``)."""
    data_files: str | list[str] | dict[str, Any] | None = None
    """``datasets``: ``load_dataset``'s ``data_files`` (e.g. with ``path: json``)."""
    revision: str | None = None
    """``datasets``: the Hub revision (a commit, tag or branch); pin it so the cache key is stable."""
    streaming: bool = False
    """``datasets``: stream the records (``load_dataset(streaming=True)``) instead of converting the data
    to Arrow first; units are then the dataset's shards."""
    hf_cache_dir: str | None = None
    """``datasets``: where ``load_dataset`` keeps its Arrow copy; None: the Hugging Face default."""
    weight: float = 1.0
    """Relative share of training blocks drawn from this source in a mixture; must be > 0."""
    assign_split: str | None = None
    """Put every document in this split (e.g. ``val`` for a held-out file) instead of hashing it."""
    key: str = ""
    """The config key named in error messages; default ``data.sources.<name>``."""
    path_key: str = ""
    """The config key of ``path`` in error messages; default ``<key>.path`` (``data.val_path`` for a
    held-out file of ``data=text``)."""

    def __post_init__(self) -> None:
        if not self.key:
            self.key = f"data.sources.{self.name}"
        if not self.path_key:
            self.path_key = f"{self.key}.path"

    def problems(self) -> list[str]:
        """Every problem with the settings (not the files), each naming its config key."""
        key, found = self.key, []
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            found.append(f"{key}.name={self.name!r}: expected a non-empty name without '/'")
        if not self.path or (isinstance(self.path, list) and not all(isinstance(p, str) for p in self.path)):
            found.append(
                f"{self.path_key}={self.path!r}: expected a file, a directory, a glob or a list of them"
            )
        if self.format not in FORMATS:
            found.append(f"{key}.format={self.format!r} is not one of {', '.join(FORMATS)}")
        if not isinstance(self.text_field, str) or not self.text_field:
            found.append(f"{key}.text_field={self.text_field!r}: expected a field name")
        weight = self.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            found.append(f"{key}.weight={weight!r}: expected a number > 0")
        elif weight <= 0:
            found.append(f"{key}.weight={weight!r}: expected a number > 0")
        if self.assign_split is not None and self.assign_split not in ("train", "val", "test"):
            found.append(f"{key}.assign_split={self.assign_split!r}: expected train, val, test or null")
        return found

    def validate(self) -> None:
        """Raise :class:`ConfigError` listing every problem with the settings."""
        if problems := self.problems():
            raise ConfigError(problems)

    def content_dict(self) -> dict[str, Any]:
        """The fields that decide which documents the source yields (not its name, weight or key)."""
        content = asdict(self)
        for ignored in ("name", "weight", "key", "path_key", "assign_split"):
            del content[ignored]
        return content


@dataclass(frozen=True)
class Unit:
    """A unit of work: a piece of one source that one process reads and tokenizes on its own."""

    index: int
    """Position in the source's plan; output shards are numbered by it."""
    kind: str
    """``txt``, ``jsonl``, ``parquet``, ``hf_rows`` (a row range of an Arrow dataset) or ``hf_shard``."""
    path: str
    """The file (or dataset path) read."""
    start: int = 0
    """First byte (txt/jsonl), row group (parquet), row (hf_rows) or shard index (hf_shard)."""
    stop: int = -1
    """End (exclusive) in the same units; -1: to the end (compressed files); for hf_shard, the number of
    shards."""
    compression: str | None = None
    """``gz``, ``zst`` or None."""
    size: int = 0
    """Input bytes the unit covers (uncompressed where known); for planning and throughput figures."""

    def describe(self) -> str:
        """Where the unit is, for messages: the file and the part of it."""
        if self.kind in ("txt", "jsonl") and self.compression is None:
            return f"{self.path} (bytes {self.start}-{self.stop})"
        if self.kind == "parquet":
            return f"{self.path} (row groups {self.start}-{self.stop - 1})"
        if self.kind == "hf_rows":
            return f"{self.path} (rows {self.start}-{self.stop - 1})"
        if self.kind == "hf_shard":
            return f"{self.path} (shard {self.start} of {self.stop})"
        return self.path

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ planning
def resolve_files(spec: SourceSpec) -> list[Path]:
    """The source's files, sorted: each path entry is a file, a directory (searched recursively for
    supported files) or a glob; :class:`DataError` names the entry that matches nothing."""
    entries = [spec.path] if isinstance(spec.path, str) else list(spec.path)
    found: set[Path] = set()
    for entry in entries:
        found.update(_resolve_entry(entry, spec))
    return sorted(found)


def _resolve_entry(entry: str, spec: SourceSpec) -> list[Path]:
    expanded = str(Path(entry).expanduser())
    if _GLOB_CHARS & set(expanded):
        matches = [Path(m).resolve() for m in glob.glob(expanded, recursive=True) if Path(m).is_file()]
        if not matches:
            raise DataError(f"{spec.path_key}: glob {entry} matches no files")
        return matches
    path = Path(expanded)
    if path.is_file():
        return [path.resolve()]
    if path.is_dir():
        matches = [p.resolve() for p in path.rglob("*") if p.is_file() and _is_supported(p)]
        if not matches:
            raise DataError(
                f"{spec.path_key}: directory {path} contains no .txt, .jsonl, .parquet (or .gz/.zst) files"
            )
        return matches
    raise DataError(f"{spec.path_key}: {path} does not exist; expected a file, a directory or a glob")


def _is_supported(path: Path) -> bool:
    suffixes = path.suffixes[-2:]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in FILE_FORMATS and not path.name.startswith(".")


def file_format(path: Path, spec: SourceSpec) -> tuple[str, str | None]:
    """(format, compression) of one file: by its suffixes, or the spec's explicit format."""
    suffixes = path.suffixes
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    inner = suffixes[-2] if compression and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    if spec.format not in ("auto", "hf"):
        fmt = spec.format
    elif inner in FILE_FORMATS:
        fmt = FILE_FORMATS[inner]
    else:
        found = "".join(suffixes[-2:]) or "(none)"
        raise DataError(
            f"{spec.path_key}: {path} has unsupported extension {found!r}; expected .txt, .jsonl or "
            ".parquet, optionally compressed (.txt.gz, .jsonl.zst), or set {spec.key}.format"
        )
    if fmt == "parquet" and compression:
        raise DataError(f"{spec.path_key}: {path}: Parquet compresses itself; expected an uncompressed file")
    return fmt, compression


def is_hf_source(spec: SourceSpec) -> bool:
    """True when the source is read with ``datasets`` (explicitly, or a ``save_to_disk`` directory)."""
    if spec.format == "hf":
        return True
    if spec.format != "auto" or not isinstance(spec.path, str):
        return False
    path = Path(spec.path).expanduser()
    return path.is_dir() and any((path / marker).is_file() for marker in HF_DISK_MARKERS)


def fingerprint(spec: SourceSpec) -> dict[str, Any]:
    """What identifies the source's content cheaply, for cache keys: each local file's path, size and
    modification time (as ``make`` and ``datasets`` do), plus the ``datasets`` options. Reading a corpus
    to hash it would cost as much as preparing it."""
    if is_hf_source(spec):
        local = Path(str(spec.path)).expanduser()
        files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else []
        files += _local_data_files(spec.data_files)
    else:
        files = resolve_files(spec)
    stats = []
    for path in files:
        stat = path.stat()
        stats.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return {"spec": spec.content_dict(), "files": stats}


def _data_file_entries(data_files: Any) -> list[str]:
    """The paths or globs of a ``data_files`` value (a string, a list, or a dict of split -> either)."""
    if data_files is None:
        return []
    if isinstance(data_files, dict):
        return [v for value in data_files.values() for v in ([value] if isinstance(value, str) else value)]
    return [data_files] if isinstance(data_files, str) else list(data_files)


def _local_data_files(data_files: Any) -> list[Path]:
    """The local files a ``data_files`` value names (globs expanded); remote ones are left out."""
    found = set()
    for value in _data_file_entries(data_files):
        found.update(Path(m).resolve() for m in glob.glob(str(Path(value).expanduser())) if Path(m).is_file())
    return sorted(found)


def plan_units(spec: SourceSpec, unit_bytes: int) -> list[Unit]:
    """Cut the source into units of about ``unit_bytes`` input bytes each (never across a document).

    The plan depends only on the source and ``unit_bytes``, so every process that plans the same source
    gets the same units.
    """
    spec.validate()
    if is_hf_source(spec):
        units = _plan_hf(spec, unit_bytes)
    else:
        units = []
        for path in resolve_files(spec):
            fmt, compression = file_format(path, spec)
            if fmt == "parquet":
                units += _plan_parquet(path, spec, unit_bytes)
            elif compression:
                units.append(Unit(0, fmt, str(path), 0, -1, compression, path.stat().st_size))
            else:
                units += _plan_plain(path, fmt, unit_bytes)
    return [Unit(i, u.kind, u.path, u.start, u.stop, u.compression, u.size) for i, u in enumerate(units)]


def _plan_plain(path: Path, fmt: str, unit_bytes: int) -> list[Unit]:
    """Byte ranges of an uncompressed text file, each ending at a document (txt) or line (jsonl) end."""
    size = path.stat().st_size
    n_pieces = max(1, math.ceil(size / unit_bytes))
    cuts = [0]
    with open(path, "rb") as handle:
        for k in range(1, n_pieces):
            cut = _next_boundary(handle, max(cuts[-1], k * size // n_pieces), size, fmt)
            if cut >= size:
                break  # no document starts after this point: the rest is one unit (and is scanned once)
            if cut > cuts[-1]:
                cuts.append(cut)
    cuts.append(size)
    return [Unit(0, fmt, str(path), a, b, None, b - a) for a, b in zip(cuts, cuts[1:], strict=False)]


def _next_boundary(handle: BinaryIO, position: int, size: int, fmt: str) -> int:
    """The first offset >= ``position`` where a document starts: after a newline (jsonl), after a
    blank line (txt); ``size`` when there is none."""
    handle.seek(position - 1 if position > 0 else 0)
    if position > 0:
        handle.readline()  # the rest of the line that holds ``position - 1``
    offset = handle.tell()
    if fmt == "jsonl":
        return min(offset, size)
    while offset < size:
        line = handle.readline()
        offset += len(line)
        if not line.decode("utf-8", errors="replace").strip():  # the same blank test as the reader's
            return offset
    return size


def _plan_parquet(path: Path, spec: SourceSpec, unit_bytes: int) -> list[Unit]:
    """Runs of consecutive row groups of about ``unit_bytes`` (uncompressed) each."""
    metadata = _parquet_file(path, spec).metadata
    units, start, size = [], 0, 0
    for group in range(metadata.num_row_groups):
        size += metadata.row_group(group).total_byte_size
        if size >= unit_bytes or group == metadata.num_row_groups - 1:
            units.append(Unit(0, "parquet", str(path), start, group + 1, None, size))
            start, size = group + 1, 0
    if not units:
        raise DataError(f"{spec.path_key}: {path} has no row groups; expected a Parquet file with documents")
    return units


def _parquet_file(path: Path, spec: SourceSpec) -> Any:
    """The opened Parquet file, after checking it has a string column ``text_field``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(
            f"{spec.path_key}: {path} is not a readable Parquet file ({_one_line(err)}); expected Parquet"
        ) from None
    schema = parquet.schema_arrow
    if spec.text_field not in schema.names:
        raise DataError(
            f"{spec.path_key}: {path} has no column {spec.text_field!r} "
            f"(columns: {', '.join(schema.names)}); set {spec.key}.text_field"
        )
    column_type = schema.field(spec.text_field).type
    if not _is_string_type(column_type):
        raise DataError(
            f"{spec.path_key}: {path} column {spec.text_field!r} is {column_type}; expected strings"
        )
    return parquet


def _is_string_type(arrow_type: Any) -> bool:
    import pyarrow as pa

    checks = (pa.types.is_string, pa.types.is_large_string, getattr(pa.types, "is_string_view", None))
    return any(check(arrow_type) for check in checks if check is not None)


def _plan_hf(spec: SourceSpec, unit_bytes: int) -> list[Unit]:
    """Row ranges of an Arrow-backed dataset, or the shards of a streaming one."""
    dataset = open_hf_dataset(spec)
    where = _hf_where(spec)
    if spec.streaming:
        return [Unit(0, "hf_shard", where, i, dataset.num_shards) for i in range(dataset.num_shards)]
    n_rows = len(dataset)
    if n_rows == 0:
        raise DataError(f"{spec.path_key}: {where} split {spec.split!r} has no rows; expected documents")
    n_bytes = max(1, int(dataset.data.nbytes))
    rows_per_unit = max(1, int(n_rows * unit_bytes / n_bytes))
    return [
        Unit(
            0,
            "hf_rows",
            where,
            a,
            min(a + rows_per_unit, n_rows),
            None,
            n_bytes * (min(a + rows_per_unit, n_rows) - a) // n_rows,
        )
        for a in range(0, n_rows, rows_per_unit)
    ]


def _hf_where(spec: SourceSpec) -> str:
    return str(spec.path) + (f" ({spec.hf_name})" if spec.hf_name else "")


def open_hf_dataset(spec: SourceSpec) -> Any:
    """The split ``spec.split`` of a ``datasets`` source, with its text column checked.

    A ``save_to_disk`` directory is opened with ``load_from_disk`` (memory-mapped, nothing copied);
    anything else goes to ``load_dataset``. A local path that does not exist is an error at once, before
    ``datasets`` would try the Hub.
    """
    import datasets

    path = str(spec.path)
    local = Path(path).expanduser()
    if local.is_dir() and any((local / marker).is_file() for marker in HF_DISK_MARKERS):
        dataset = _from_disk(local, spec)
    else:
        looks_local = path.startswith(("/", ".", "~")) or local.exists()
        if looks_local and not local.exists():
            raise DataError(f"{spec.path_key}: {local} does not exist; expected a dataset directory or files")
        if not looks_local and path not in HF_PACKAGED_BUILDERS and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise DataError(f"{spec.path_key}: {path} is not a local dataset and HF_HUB_OFFLINE=1")
        if path in HF_PACKAGED_BUILDERS:
            _check_local_data_files(spec)
        try:
            dataset = datasets.load_dataset(
                str(local) if looks_local else path,
                name=spec.hf_name,
                split=spec.split,
                data_files=spec.data_files,
                revision=spec.revision,
                streaming=spec.streaming,
                cache_dir=spec.hf_cache_dir,
            )
        except (ValueError, OSError, KeyError, RuntimeError) as err:  # OSError: also connection errors
            raise DataError(
                f"{spec.path_key}: datasets.load_dataset({path!r}, split={spec.split!r}) failed: "
                f"{_one_line(err)}"
            ) from None
    _check_hf_column(dataset, spec)
    return dataset


def _check_local_data_files(spec: SourceSpec) -> None:
    """A ``data_files`` entry that is a local path or glob must match a file (``datasets`` would fail
    later with a less helpful message)."""
    for value in _data_file_entries(spec.data_files):
        if "://" not in value and not glob.glob(str(Path(value).expanduser())):
            raise DataError(f"{spec.key}.data_files: {value} matches no files; expected local data files")


def _from_disk(local: Path, spec: SourceSpec) -> Any:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(local))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(f"{spec.path_key}: {local} cannot be loaded ({_one_line(err)})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if spec.split not in dataset:
            raise DataError(
                f"{spec.key}.split={spec.split!r}: {local} has splits {', '.join(dataset)}; "
                "expected one of them"
            )
        dataset = dataset[spec.split]
    if spec.streaming:
        dataset = dataset.to_iterable_dataset(num_shards=max(1, len(dataset.cache_files)))
    return dataset


def _check_hf_column(dataset: Any, spec: SourceSpec) -> None:
    features = getattr(dataset, "features", None)
    if features is None:  # a streaming dataset may not know its columns before reading
        return
    if spec.text_field not in features:
        raise DataError(
            f"{spec.path_key}: {_hf_where(spec)} has no column {spec.text_field!r} "
            f"(columns: {', '.join(features)}); set {spec.key}.text_field"
        )
    dtype = getattr(features[spec.text_field], "dtype", None)
    if dtype not in ("string", "large_string", "string_view"):
        raise DataError(
            f"{spec.path_key}: {_hf_where(spec)} column {spec.text_field!r} is "
            f"{features[spec.text_field]}; expected strings"
        )


# ------------------------------------------------------------------------------------------- reading
def read_unit(unit: Unit, spec: SourceSpec, dataset: Any = None) -> Iterator[str]:
    """Yield the documents of ``unit`` lazily, in order. ``dataset``: an already opened ``datasets``
    source (what :func:`open_hf_dataset` returns), to avoid reopening it for every unit."""
    if unit.kind in ("txt", "jsonl"):
        reader = _txt_documents if unit.kind == "txt" else _jsonl_documents
        yield from reader(unit, spec)
    elif unit.kind == "parquet":
        yield from _parquet_documents(unit, spec)
    elif unit.kind in ("hf_rows", "hf_shard"):
        yield from _hf_documents(unit, spec, dataset if dataset is not None else open_hf_dataset(spec))
    else:
        raise DataError(f"{spec.key}: unit {unit.index} has unknown kind {unit.kind!r}")


def iter_documents(spec: SourceSpec, unit_bytes: int = 64 << 20) -> Iterator[str]:
    """Every document of a source, in order (all its units, one after another)."""
    dataset = open_hf_dataset(spec) if is_hf_source(spec) else None
    for unit in plan_units(spec, unit_bytes):
        yield from read_unit(unit, spec, dataset)


class _Lines:
    """The raw lines of a unit of a text file, decoded as UTF-8, with their line numbers for messages.

    Line numbers are counted from the start of the unit; the absolute number in the file is computed only
    when a message needs it (by counting the newlines before the unit).
    """

    def __init__(self, unit: Unit, spec: SourceSpec) -> None:
        self.unit, self.spec = unit, spec
        self.line_in_unit = 0
        self.offset = unit.start  # byte offset of the current line (uncompressed files)

    def __iter__(self) -> Iterator[str]:
        unit, stop = self.unit, self.unit.stop if self.unit.stop >= 0 else math.inf
        with _open_binary(unit, self.spec) as handle:
            if unit.start:
                handle.seek(unit.start)
            next_offset = unit.start
            while next_offset < stop:
                try:
                    raw = handle.readline()
                except (EOFError, OSError, zlib.error, ValueError) as err:
                    raise self.error(self._damaged(err), line=False) from None
                if not raw:
                    return
                self.offset, next_offset = next_offset, next_offset + len(raw)
                self.line_in_unit += 1
                yield self._decode(raw)

    def _decode(self, raw: bytes) -> str:
        if b"\0" in raw:
            raise self.error("looks binary (contains NUL bytes); expected UTF-8 text")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            where = "" if self.unit.compression else f" at byte offset {self.offset + err.start}"
            raise self.error(
                f"is not valid UTF-8 (byte 0x{raw[err.start]:02x}{where}); expected UTF-8 text"
            ) from None
        if self.offset == 0 and self.line_in_unit == 1:
            text = text.removeprefix("\ufeff")
        return text.removesuffix("\n").removesuffix("\r")

    def _damaged(self, err: BaseException) -> str:
        kind = {"gz": "gzip", "zst": "zstd"}.get(self.unit.compression or "", "")
        after = f"after line {self.line_in_unit}"
        if isinstance(err, EOFError) or "truncated" in str(err):
            return (
                f"is truncated ({kind} stream ends early {after}: {_one_line(err)}); expected a complete file"
            )
        return f"cannot be read {after} ({_one_line(err)}); expected a valid {kind or 'text'} file"

    def line_number(self) -> int:
        """The absolute line number of the current line in the (uncompressed) file."""
        if self.unit.compression or not self.unit.start:
            return self.line_in_unit
        with open(self.unit.path, "rb") as handle:
            before, remaining = 0, self.unit.start
            while remaining > 0:
                chunk = handle.read(min(_READ_BUFFER, remaining))
                if not chunk:
                    break
                before += chunk.count(b"\n")
                remaining -= len(chunk)
        return before + self.line_in_unit

    def error(self, what: str, line: bool = True) -> DataError:
        where = f" line {self.line_number()}" if line and self.line_in_unit else ""
        return DataError(f"{self.spec.path_key}: {self.unit.path}{where}: {what}")


def _open_binary(unit: Unit, spec: SourceSpec) -> BinaryIO:
    try:
        if unit.compression == "gz":
            return gzip.open(unit.path, "rb")
        if unit.compression == "zst":
            return io.BufferedReader(_ZstdReader(unit.path), buffer_size=_READ_BUFFER)
        return open(unit.path, "rb", buffering=_READ_BUFFER)
    except FileNotFoundError:
        raise DataError(f"{spec.path_key}: {unit.path} does not exist (it was there when planned)") from None
    except OSError as err:
        raise DataError(f"{spec.path_key}: {unit.path} cannot be read ({err.strerror})") from None


class _ZstdReader(io.RawIOBase):
    """A readable stream of a ``.zst`` file that, unlike zstandard's stream_reader, fails on a truncated
    file (stream_reader silently stops where the data ends) and reads concatenated frames."""

    def __init__(self, path: str) -> None:
        import zstandard

        self._file = open(path, "rb")
        self._zstd = zstandard
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._frame_started = False
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            compressed = self._file.read(_READ_BUFFER)
            if not compressed:
                if self._frame_started and not self._frame.eof:
                    raise EOFError("the last zstd frame is incomplete")
                return 0
            self._pending = self._decompress(compressed)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame.eof:  # the next frame of a concatenated file
                self._frame = self._decompressor.decompressobj()
            self._frame_started = True
            try:
                out.append(self._frame.decompress(data))
            except self._zstd.ZstdError as err:
                raise ValueError(str(err)) from None
            data = self._frame.unused_data if self._frame.eof else b""
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()


def _txt_documents(unit: Unit, spec: SourceSpec) -> Iterator[str]:
    lines = _Lines(unit, spec)
    current: list[str] = []
    n_documents = 0
    for text in lines:
        parts = text.split("\r") if "\r" in text else (text,)  # a lone \r is a line break too
        for line in parts:
            if line.strip():
                current.append(line)
            elif current:
                n_documents += 1
                yield "\n".join(current).rstrip()
                current = []
    if current:
        n_documents += 1
        yield "\n".join(current).rstrip()
    if n_documents == 0:
        raise _no_documents(unit, spec)


def _jsonl_documents(unit: Unit, spec: SourceSpec) -> Iterator[str]:
    lines = _Lines(unit, spec)
    field_name, n_documents = spec.text_field, 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            what = f"malformed JSON ({err.msg} at column {err.colno}); expected one object per line"
            raise lines.error(what) from None
        if not isinstance(record, dict):
            raise lines.error(f"expected a JSON object, got {type(record).__name__}")
        if field_name not in record:
            raise lines.error(f"has no field {field_name!r}; expected a string field {field_name!r}")
        value = record[field_name]
        if not isinstance(value, str):
            raise lines.error(f"field {field_name!r} is {type(value).__name__}; expected a string")
        if value.strip():
            n_documents += 1
            yield value
    if n_documents == 0:
        raise _no_documents(unit, spec)


def _no_documents(unit: Unit, spec: SourceSpec) -> DataError:
    return DataError(f"{spec.path_key}: {unit.describe()} contains no documents; expected non-empty text")


def _parquet_documents(unit: Unit, spec: SourceSpec) -> Iterator[str]:
    import pyarrow as pa

    parquet = _parquet_file(Path(unit.path), spec)
    n_documents = 0
    for group in range(unit.start, unit.stop):
        try:
            batches = parquet.iter_batches(_BATCH_ROWS, row_groups=[group], columns=[spec.text_field])
            for batch in batches:
                for value in batch.column(0).to_pylist():
                    if value is not None and value.strip():
                        n_documents += 1
                        yield value
        except (pa.ArrowException, OSError) as err:
            raise DataError(
                f"{spec.path_key}: {unit.path} row group {group} is damaged ({_one_line(err)}); "
                "expected a readable Parquet file"
            ) from None
    if n_documents == 0:
        raise _no_documents(unit, spec)


def _hf_documents(unit: Unit, spec: SourceSpec, dataset: Any) -> Iterator[str]:
    field_name = spec.text_field
    if unit.kind == "hf_rows":
        part = dataset.select(range(unit.start, unit.stop)).select_columns([field_name])
        for batch in part.iter(batch_size=_BATCH_ROWS):
            for value in batch[field_name]:
                if value is not None and value.strip():
                    yield value
        return
    for row_number, row in enumerate(dataset.shard(num_shards=unit.stop, index=unit.start)):
        if field_name not in row:
            raise DataError(
                f"{spec.path_key}: {unit.describe()} row {row_number} has no field {field_name!r} "
                f"(fields: {', '.join(row)}); set {spec.key}.text_field"
            )
        value = row[field_name]
        if not isinstance(value, str | None):
            raise DataError(
                f"{spec.path_key}: {unit.describe()} row {row_number} field {field_name!r} is "
                f"{type(value).__name__}; expected a string"
            )
        if value is not None and value.strip():
            yield value


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


__all__ = [
    "FORMATS",
    "SourceSpec",
    "Unit",
    "file_format",
    "fingerprint",
    "is_hf_source",
    "iter_documents",
    "open_hf_dataset",
    "plan_units",
    "read_unit",
    "resolve_files",
]
