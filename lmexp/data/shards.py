"""Token shards: the files preparation writes, their index entries, checks, and one stream view over many.

A shard holds the documents of one unit of work (see :mod:`lmexp.data.sources`) that fell into one split,
in the packing format of :mod:`lmexp.data.packing`: ``tokens(doc) [eos]`` for each document, and the
shard of unit 0 starts with one extra ``[eos]``. The concatenation of a split's shards in unit order is
therefore exactly ``[eos] doc [eos] doc ... [eos]``, the packed stream of the whole split, and
:class:`ShardStream` serves it as one array.

Files of a shard ``<stem>`` (e.g. ``u00007.train``):

    <stem>.bin    the tokens, raw uint16 (vocabularies up to 65,536) or uint32
    <stem>.docs   int64[3, n_documents], one row per column: the position of each document's closing
                  eos in the shard, and the running totals of UTF-8 bytes and of words up to and
                  including that document

Bytes and words (for bits per byte and bits per word): a document's UTF-8 byte count is the length of its
text as the source reader yields it (newlines normalised, without the blank lines that separate ``.txt``
documents), and its word count is ``len(text.split())``, its whitespace-separated words. Both are
*attributed to the document's closing eos token*. So over a whole split (where every closing eos is a
prediction target exactly once) the totals are exact, and the bytes of any token range are two binary
searches: the documents whose eos lies in the range. Summed NLL in bits over a split divided by its
bytes is ``bpb``; the prediction of each closing eos belongs to its document.

Every file is written under a temporary name and renamed; the index entry
(:class:`ShardInfo`) is written by the caller after that, so a shard with an entry is complete. The entry
records sizes, counts and checksums that :func:`verify_shard` compares with the files.
"""

from __future__ import annotations

import os
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from lmexp.errors import DataError

TOKENS_SUFFIX, DOCS_SUFFIX = ".bin", ".docs"
_DOC_COLUMNS = 3  # closing-eos position, cumulative bytes, cumulative words
_SAMPLE_WINDOWS, _SAMPLE_WINDOW_BYTES = 16, 4096
_COPY_BYTES = 1 << 20
_COPY_ROWS = 1 << 16  # doc-table rows rewritten at a time (1.5 MiB)
_MAX_OPEN_SHARDS = 64  # memory maps kept open by a ShardStream (each holds a file descriptor)
VERIFY_LEVELS = ("size", "sample", "full")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype for a vocabulary (the rule of :func:`lmexp.data.packing.token_dtype`,
    restated here so preparation workers need not import torch)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class ShardInfo:
    """The index entry of one token shard."""

    stem: str
    """File name without suffix, e.g. ``u00007.train``; the files are ``<stem>.bin`` and ``<stem>.docs``."""
    n_tokens: int
    """Tokens in ``<stem>.bin``."""
    n_documents: int
    """Documents, i.e. closing eos tokens, in the shard."""
    n_words: int
    """Whitespace-separated words of those documents."""
    n_bytes: int
    """UTF-8 bytes of those documents."""
    dtype: str
    """``uint16`` or ``uint32``."""
    crc32: int
    """CRC-32 of the whole token file, computed while writing (checked by ``verify="full"``)."""
    sample_crc32: int
    """CRC-32 of both files' sizes and of 16 evenly spaced 4 KiB windows of each (checked on every open)."""

    @property
    def tokens_file(self) -> str:
        return self.stem + TOKENS_SUFFIX

    @property
    def docs_file(self) -> str:
        return self.stem + DOCS_SUFFIX

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> ShardInfo:
        return cls(**{name: record[name] for name in cls.__dataclass_fields__})


class ShardWriter:
    """Appends tokenized documents to one shard; :meth:`finish` puts the files in place.

    Temporary files have fixed names (``.<stem>.*.tmp``): only the holder of the unit's lock writes them,
    and a build killed half-way leaves files that the next build of the unit overwrites. Files are not
    fsync'ed: a killed process loses nothing the page cache holds, and after a power cut the size and
    checksum checks on open (:func:`verify_shard`) find a torn shard, which preparation then rebuilds.
    """

    def __init__(self, directory: Path, stem: str, dtype: np.dtype, eos_id: int, leading_eos: bool) -> None:
        self.directory, self.stem, self.dtype, self.eos_id = Path(directory), stem, np.dtype(dtype), eos_id
        self._tmp = {name: self.directory / f".{stem}.{name}.tmp" for name in ("bin", "rows", "docs")}
        self._tokens, self._rows = open(self._tmp["bin"], "wb"), open(self._tmp["rows"], "wb")
        self.n_tokens = self.n_documents = self.n_words = self.n_bytes = 0
        self._crc = 0
        if leading_eos:
            self._write_tokens(np.array([eos_id], dtype=self.dtype))

    def _write_tokens(self, tokens: np.ndarray) -> None:
        data = tokens.tobytes()
        self._tokens.write(data)
        self._crc = zlib.crc32(data, self._crc)
        self.n_tokens += len(tokens)

    def add(self, ids: Sequence[Sequence[int]], n_bytes: Sequence[int], n_words: Sequence[int]) -> None:
        """Append documents: their token ids (without eos), UTF-8 byte and word counts."""
        if not ids:
            return
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        ends = np.cumsum(lengths)  # where each document's eos goes, before the eos are inserted
        tokens = np.insert(flat, ends, self.dtype.type(self.eos_id))
        rows = np.empty((len(ids), _DOC_COLUMNS), dtype=np.int64)
        rows[:, 0] = self.n_tokens + ends + np.arange(len(ids))  # each earlier eos shifts a document by one
        rows[:, 1] = self.n_bytes + np.cumsum(np.asarray(n_bytes, dtype=np.int64))
        rows[:, 2] = self.n_words + np.cumsum(np.asarray(n_words, dtype=np.int64))
        self._write_tokens(tokens)
        self._rows.write(rows.tobytes())
        self.n_documents += len(ids)
        self.n_bytes, self.n_words = int(rows[-1, 1]), int(rows[-1, 2])

    def finish(self) -> ShardInfo:
        """Rename the files into place (``<stem>.bin``, ``<stem>.docs``) and describe the shard."""
        self._tokens.close()
        self._rows.close()
        self._write_columns()
        info = ShardInfo(
            stem=self.stem,
            n_tokens=self.n_tokens,
            n_documents=self.n_documents,
            n_words=self.n_words,
            n_bytes=self.n_bytes,
            dtype=self.dtype.name,
            crc32=self._crc,
            sample_crc32=sample_checksum(self._tmp["bin"], self._tmp["docs"]),
        )
        os.replace(self._tmp["bin"], self.directory / info.tokens_file)
        os.replace(self._tmp["docs"], self.directory / info.docs_file)
        self._tmp["rows"].unlink(missing_ok=True)
        return info

    def _write_columns(self) -> None:
        """Rewrite the rows (one per document, appended while tokenizing) as three contiguous columns,
        which binary searches need; one column at a time, in slices, so memory stays small."""
        n = self.n_documents
        rows = np.memmap(self._tmp["rows"], dtype=np.int64, mode="r", shape=(n, _DOC_COLUMNS)) if n else None
        with open(self._tmp["docs"], "wb") as out:
            for column in range(_DOC_COLUMNS):
                for start in range(0, n, _COPY_ROWS):
                    out.write(np.ascontiguousarray(rows[start : start + _COPY_ROWS, column]).tobytes())
        del rows

    def abort(self) -> None:
        """Close and delete the temporary files (nothing in place is touched)."""
        self._tokens.close()
        self._rows.close()
        for path in self._tmp.values():
            path.unlink(missing_ok=True)


def sample_checksum(*paths: Path) -> int:
    """CRC-32 of each file's size and of ``16`` evenly spaced 4 KiB windows of it: O(1) reads, yet it
    catches truncation, a file swapped for another, and most overwrites."""
    crc = 0
    for path in paths:
        size = os.path.getsize(path)
        crc = zlib.crc32(size.to_bytes(8, "little"), crc)
        with open(path, "rb") as handle:
            if size <= _SAMPLE_WINDOWS * _SAMPLE_WINDOW_BYTES:
                crc = zlib.crc32(handle.read(), crc)
                continue
            for k in range(_SAMPLE_WINDOWS):
                handle.seek(k * (size - _SAMPLE_WINDOW_BYTES) // (_SAMPLE_WINDOWS - 1))
                crc = zlib.crc32(handle.read(_SAMPLE_WINDOW_BYTES), crc)
    return crc


def full_checksum(path: Path) -> int:
    """CRC-32 of a whole file, read in 1 MiB pieces."""
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_COPY_BYTES):
            crc = zlib.crc32(chunk, crc)
    return crc


def verify_shard(directory: Path, info: ShardInfo, eos_id: int, level: str = "sample") -> str | None:
    """What is wrong with a shard's files compared with its entry, or None when they agree.

    ``size``: both files exist with the sizes the counts imply, the last document ends with an eos at the
    shard's last token and the running totals end at the entry's bytes and words. ``sample`` (default)
    adds :func:`sample_checksum`; ``full`` adds the CRC-32 of every token, and checks that every recorded
    eos position holds an eos token.
    """
    if level not in VERIFY_LEVELS:
        raise ValueError(f"verify level {level!r} is not one of {', '.join(VERIFY_LEVELS)}")
    directory = Path(directory)
    tokens_path, docs_path = directory / info.tokens_file, directory / info.docs_file
    itemsize = np.dtype(info.dtype).itemsize
    for path, expected in ((tokens_path, info.n_tokens * itemsize), (docs_path, info.n_documents * 24)):
        if not path.is_file():
            return f"{path.name} is missing"
        actual = path.stat().st_size
        if actual != expected:
            return f"{path.name} is {actual} bytes, expected {expected} (truncated or overwritten)"
    if level in ("sample", "full") and sample_checksum(tokens_path, docs_path) != info.sample_crc32:
        return f"{info.stem} fails its sampled checksum (the files were altered)"
    if info.n_documents:
        tokens = np.memmap(tokens_path, dtype=info.dtype, mode="r")
        docs = np.memmap(docs_path, dtype=np.int64, mode="r", shape=(_DOC_COLUMNS, info.n_documents))
        last = (int(docs[0, -1]), int(docs[1, -1]), int(docs[2, -1]))
        if last != (info.n_tokens - 1, info.n_bytes, info.n_words) or int(tokens[-1]) != eos_id:
            return (
                f"{info.stem} disagrees with its entry (last eos, bytes, words = {last}; expected "
                f"{(info.n_tokens - 1, info.n_bytes, info.n_words)})"
            )
        if level == "full" and not np.all(np.asarray(tokens[np.asarray(docs[0])]) == eos_id):
            return f"{info.stem}: a recorded document end does not hold the eos token"
    if level == "full" and full_checksum(tokens_path) != info.crc32:
        return f"{info.tokens_file} fails its CRC-32 (the tokens were altered)"
    return None


class ShardStream:
    """Several shards read as one token stream (a drop-in for the memmap :class:`TokenBlocks` takes).

    ``stream[a:b]`` returns the tokens of positions a..b-1 across shard boundaries as one array, opening
    each shard's memory map on first use (at most 64 stay open). Empty shards are skipped. Pickling sends
    file names, not tokens, so DataLoader workers reopen the maps themselves.
    """

    def __init__(self, directory: Path, shards: Sequence[ShardInfo], name: str = "stream") -> None:
        self.directory = Path(directory)
        self.name = name
        self.shards = [shard for shard in shards if shard.n_tokens > 0]
        dtypes = {shard.dtype for shard in self.shards}
        if len(dtypes) > 1:
            raise DataError(f"{self.directory}: {name} mixes token dtypes {sorted(dtypes)}; rebuild it")
        self.dtype = np.dtype(dtypes.pop() if dtypes else "uint16")
        self._token_starts = np.cumsum([0] + [s.n_tokens for s in self.shards]).astype(np.int64)
        self._doc_starts = np.cumsum([0] + [s.n_documents for s in self.shards]).astype(np.int64)
        self._byte_starts = np.cumsum([0] + [s.n_bytes for s in self.shards]).astype(np.int64)
        self._word_starts = np.cumsum([0] + [s.n_words for s in self.shards]).astype(np.int64)
        # per open shard: its tokens and doc table as plain ndarray views of their memory maps
        self._open: OrderedDict[int, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()

    # ------------------------------------------------------------------------------- totals
    def __len__(self) -> int:
        return int(self._token_starts[-1])

    @property
    def n_documents(self) -> int:
        return int(self._doc_starts[-1])

    @property
    def n_bytes(self) -> int:
        return int(self._byte_starts[-1])

    @property
    def n_words(self) -> int:
        return int(self._word_starts[-1])

    # ------------------------------------------------------------------------------- tokens
    def _maps(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index]
        shard = self.shards[index]
        tokens = np.memmap(
            self.directory / shard.tokens_file, dtype=self.dtype, mode="r", shape=(shard.n_tokens,)
        )
        docs = None
        if shard.n_documents:
            docs_path = self.directory / shard.docs_file
            docs = np.memmap(docs_path, dtype=np.int64, mode="r", shape=(_DOC_COLUMNS, shard.n_documents))
        # np.asarray: the same memory without np.memmap's per-index overhead (the maps stay open)
        self._open[index] = (np.asarray(tokens), None if docs is None else np.asarray(docs))
        if len(self._open) > _MAX_OPEN_SHARDS:
            self._open.popitem(last=False)
        return self._open[index]

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("a ShardStream slice must have step 1")
            return self.read(start, stop)
        position = int(key)
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(f"position {key} out of range for {len(self)} tokens")
        return self.read(position, position + 1)[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens at positions ``start`` .. ``stop - 1`` (clipped to the stream) as one array."""
        start, stop = max(0, start), min(stop, len(self))
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        index = int(self._token_starts.searchsorted(start, side="right")) - 1
        pieces = []
        while index < len(self.shards) and self._token_starts[index] < stop:
            offset = int(self._token_starts[index])
            tokens, _ = self._maps(index)
            pieces.append(tokens[max(0, start - offset) : stop - offset])
            index += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    # ---------------------------------------------------------------------- bytes and words
    def documents_before(self, position: int) -> tuple[int, int, int]:
        """(documents, bytes, words) of the documents whose closing eos is at a position < ``position``."""
        if position <= 0 or not self.shards:
            return 0, 0, 0
        if position >= len(self):
            return self.n_documents, self.n_bytes, self.n_words
        index = int(self._token_starts.searchsorted(position, side="right")) - 1
        _, docs = self._maps(index)
        before = int(self._doc_starts[index]), int(self._byte_starts[index]), int(self._word_starts[index])
        if docs is None:
            return before
        k = int(docs[0].searchsorted(position - self._token_starts[index], side="left"))
        if k == 0:
            return before
        return before[0] + k, before[1] + int(docs[1, k - 1]), before[2] + int(docs[2, k - 1])

    def documents_between(self, start: int, stop: int) -> tuple[int, int, int]:
        """(documents, bytes, words) of the documents whose closing eos lies in ``start`` .. ``stop - 1``."""
        high, low = self.documents_before(stop), self.documents_before(start)
        return high[0] - low[0], high[1] - low[1], high[2] - low[2]

    # ------------------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # maps are reopened lazily in the receiving process
        return state

    def __repr__(self) -> str:
        return (
            f"ShardStream({self.name!r}, {len(self.shards)} shards, {len(self):,} tokens, "
            f"{self.n_documents:,} documents)"
        )
