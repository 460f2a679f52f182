"""Parallel, bounded-memory preparation: a source's documents -> token shards per split, built once.

:func:`prepare_source` plans the source into units of work (:func:`lmexp.data.sources.plan_units`), then
worker processes (one per CPU core by default) each stream the documents of a unit, tokenize them in
chunks of about 1 MiB of text, and append them to the unit's shards (:mod:`lmexp.data.shards`), one per
split. Nothing holds more than a chunk, so peak memory does not grow with the corpus.

Several processes can share the work: DDP ranks, SLURM nodes or the tasks of a SLURM array call
:func:`prepare_source` with their ``rank`` and ``world_size`` on a shared file system. Unit ``u`` belongs to
process ``u % world_size``; each process builds its own units first, then takes over any other unit not
yet built (an owner that died, or a slower one), so every process returns only when every unit exists.
A unit is built under its own file lock and its index entry (``u<NNNNN>.json``) is written last, so each
unit is built exactly once and a shard without an entry is never read. A build killed half-way (even by
``kill -9``) leaves no entry: the next run builds that unit again and keeps the finished ones.

Splits are decided per document, by a seeded hash of its UTF-8 text (:func:`split_of`): the same document
always lands in the same split whatever the unit layout or number of processes, and duplicate documents
cannot leak from train into val.

Cache layout (under ``cache_dir``)::

    sources/<source_key>/plan.json                    the units of a source (key: the source's
                                                      settings, each file's path/size/mtime, unit size)
    sources/<source_key>/tokens-<token_key>/          one tokenization of it (key: tokenizer file
                                                      digest, split fractions and seed)
        u00000.train.bin, u00000.train.docs, ...      the shards of unit 0, one pair per split
        u00000.json                                   unit 0's index entry (written last)
        u00000.lock                                   unit 0's build lock
        builds.log                                    one line per unit build (host, pid, seconds)
        index.json                                    every entry and the split totals, once complete
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from lmexp.cache import atomic_write_json, build_lock, files_digest, stable_hash
from lmexp.data.shards import (
    VERIFY_LEVELS,
    ShardInfo,
    ShardStream,
    ShardWriter,
    token_dtype,
    verify_shard,
)
from lmexp.data.sources import (
    SourceSpec,
    Unit,
    fingerprint,
    is_hf_source,
    open_hf_dataset,
    plan_units,
    read_unit,
)
from lmexp.data.tokenizer import tokenizer_files
from lmexp.errors import ConfigError, DataError, StorageError, UserError, is_storage_failure

log = logging.getLogger(__name__)

ENGINE_VERSION = 1  # bump when the shard layout or the split rule changes
SPLITS = ("train", "val", "test")
PLAN_FILE, INDEX_FILE, BUILDS_LOG = "plan.json", "index.json", "builds.log"
MIN_UNIT_BYTES, MAX_UNIT_BYTES, TARGET_UNITS = 4 << 20, 256 << 20, 64


@dataclass
class PrepareConfig:
    """How documents become token shards. ``splits``, ``split_seed`` and ``unit_bytes`` are part of the
    cache keys; the other fields change how the work is done, not its result."""

    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.9, "val": 0.05, "test": 0.05})
    """Fraction of documents per split (train, val, test), summing to 1."""
    split_seed: int = 0
    """Seed of the per-document split hash."""
    unit_bytes: int = 0
    """Input bytes per unit of work; 0: the corpus / 64, between 4 MiB and 256 MiB (independent of the
    machine, so every process plans the same units)."""
    chunk_bytes: int = 1 << 18
    """Characters of text a worker tokenizes at once. Its memory is about 12 times this (token ids are Python
    ints until written); larger chunks are no faster and leave a fragmented heap that grows over a unit."""
    workers: int = 0
    """Tokenizing worker processes this process starts; 0: one per CPU core it may use."""
    verify: str = "sample"
    """How shards are checked when opened: ``size``, ``sample`` (sizes and a sampled checksum) or
    ``full`` (every byte)."""

    def problems(self, key: str = "data") -> list[str]:
        """Every problem with the settings, each naming its config key under ``key``."""
        found = []
        unknown = sorted(set(self.splits) - set(SPLITS))
        if unknown:
            found.append(f"{key}.splits has unknown split(s) {unknown}: expected train, val, test")
        values = list(self.splits.values())
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1 for v in values):
            found.append(f"{key}.splits={self.splits}: expected fractions in [0, 1]")
        elif abs(sum(values) - 1) > 1e-6:
            found.append(f"{key}.splits: fractions sum to {sum(values):g}; expected 1")
        elif self.splits.get("train", 0) <= 0:
            found.append(f"{key}.splits.train must be > 0")
        for name, minimum in (("unit_bytes", 0), ("workers", 0), ("chunk_bytes", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                found.append(f"{key}.{name}={value!r}: expected an integer >= {minimum}")
        if self.verify not in VERIFY_LEVELS:
            found.append(f"{key}.verify={self.verify!r} is not one of {', '.join(VERIFY_LEVELS)}")
        return found

    def validate(self) -> None:
        if problems := self.problems():
            raise ConfigError(problems)

    def resolved_workers(self) -> int:
        """Worker processes to start, with 0 resolved to the CPU cores this process may use."""
        if self.workers:
            return self.workers
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # macOS
            return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------- splits
class SplitRule:
    """Which split a document belongs to: ``blake2b(text, key=seed)`` read as a number in [0, 1), against
    the cumulative fractions of train, val, test (in that order). Deterministic per document text."""

    def __init__(self, fractions: dict[str, float], seed: int, assign: str | None = None) -> None:
        self.assign = assign
        self.names = [name for name in SPLITS if fractions.get(name, 0) > 0] if assign is None else [assign]
        self._key = int(seed).to_bytes(16, "little", signed=True)
        bounds, total = [], 0.0
        for name in self.names[:-1]:
            total += fractions[name]
            bounds.append(int(total * 2**64))
        self._bounds = bounds

    def __call__(self, text_bytes: bytes) -> str:
        if len(self.names) == 1:
            return self.names[0]
        value = int.from_bytes(hashlib.blake2b(text_bytes, digest_size=8, key=self._key).digest(), "little")
        for name, bound in zip(self.names, self._bounds, strict=False):
            if value < bound:
                return name
        return self.names[-1]


def split_of(text: str, fractions: dict[str, float], seed: int) -> str:
    """The split of one document (see :class:`SplitRule`)."""
    return SplitRule(fractions, seed)(text.encode("utf-8"))


# --------------------------------------------------------------------------------------- planning
@dataclass
class SourcePlan:
    """A source cut into units, as stored in ``plan.json``."""

    spec: SourceSpec
    """The source."""
    units: list[Unit]
    """Its units of work, in document order."""
    key: str
    """The source key: the directory name under ``<cache_dir>/sources``."""
    directory: Path
    """``<cache_dir>/sources/<key>``: the plan and, below it, one directory per tokenization."""

    @property
    def input_bytes(self) -> int:
        return sum(unit.size for unit in self.units)


def source_key(spec: SourceSpec, config: PrepareConfig) -> str:
    """The cache key of a source's plan: its settings, each file's path/size/mtime, the unit size."""
    return stable_hash(
        {"engine": ENGINE_VERSION, "source": fingerprint(spec), "unit_bytes": config.unit_bytes}
    )


def auto_unit_bytes(spec: SourceSpec, config: PrepareConfig) -> int:
    """The unit size: ``config.unit_bytes``, or the source's size / 64 within [4 MiB, 256 MiB]."""
    if config.unit_bytes:
        return config.unit_bytes
    if is_hf_source(spec):
        dataset = open_hf_dataset(spec)
        total = 0 if spec.streaming else int(dataset.data.nbytes)
    else:
        total = sum(size for _, size, _ in fingerprint(spec)["files"])
    return min(MAX_UNIT_BYTES, max(MIN_UNIT_BYTES, total // TARGET_UNITS))


def plan_source(spec: SourceSpec, cache_dir: Path, config: PrepareConfig) -> SourcePlan:
    """The source's units, planned once and stored (under a lock) so every process uses the same plan."""
    spec.validate()
    config.validate()
    key = source_key(spec, config)
    directory = Path(cache_dir).expanduser() / "sources" / key
    plan_file = directory / PLAN_FILE
    if not plan_file.is_file():
        with build_lock(directory):
            if not plan_file.is_file():
                units = plan_units(spec, auto_unit_bytes(spec, config))
                record = {
                    "engine": ENGINE_VERSION,
                    "source": spec.content_dict(),
                    "units": [asdict(u) for u in units],
                }
                atomic_write_json(plan_file, record)
                log.info("planned %s: %d units", spec.name, len(units))
    try:
        record = json.loads(plan_file.read_text(encoding="utf-8"))
        units = [Unit(**unit) for unit in record["units"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(
            f"{plan_file}: unreadable plan ({type(err).__name__}); delete {directory} to replan"
        ) from None
    return SourcePlan(spec, units, key, directory)


# -------------------------------------------------------------------------------------- preparing
@dataclass
class PreparedSource:
    """A source's token shards, complete and checked: split streams and their totals."""

    spec: SourceSpec
    directory: Path
    """The token directory ``sources/<source_key>/tokens-<token_key>``."""
    entries: list[dict[str, Any]]
    """One index entry per unit: ``{"unit": ..., "shards": {split: ShardInfo dict}, ...}``."""
    eos_id: int
    """The tokenizer's eos id, which ends every document in the streams."""
    vocab_size: int
    """The tokenizer's vocabulary size (uint16 tokens up to 65,536, else uint32)."""

    @property
    def splits(self) -> list[str]:
        """The splits that have shards (every split with a positive fraction, or the assigned one)."""
        return [s for s in SPLITS if any(s in entry["shards"] for entry in self.entries)]

    def shard_infos(self, split: str) -> list[ShardInfo]:
        """The split's shards, in unit order."""
        return [ShardInfo.from_dict(e["shards"][split]) for e in self.entries if split in e["shards"]]

    def stream(self, split: str) -> ShardStream:
        """The split's token stream: ``[eos] doc [eos] doc ... [eos]`` over all units in order."""
        if split not in self.splits:
            raise DataError(f"{self.spec.key}: has no {split} split (it has {', '.join(self.splits)})")
        return ShardStream(self.directory, self.shard_infos(split), name=f"{self.spec.name}/{split}")

    def totals(self, split: str) -> dict[str, int]:
        """Tokens, documents, words and UTF-8 bytes of a split (exact sums of the index entries)."""
        infos = self.shard_infos(split)
        return {
            "n_tokens": sum(i.n_tokens for i in infos),
            "n_documents": sum(i.n_documents for i in infos),
            "n_words": sum(i.n_words for i in infos),
            "n_bytes": sum(i.n_bytes for i in infos),
        }

    def blocks(self, split: str, block_size: int, pad_id: int, source_id: int = 0) -> Any:
        """A :class:`~lmexp.data.blocks.StreamBlocks` dataset over the split (imports torch)."""
        from lmexp.data.blocks import StreamBlocks

        return StreamBlocks(
            self.stream(split), block_size, pad_id, source_id, split=f"{self.spec.name}/{split}"
        )


def token_directory(plan: SourcePlan, tokenizer_path: Path, config: PrepareConfig) -> Path:
    """Where a source's shards for this tokenizer and split rule live."""
    key = stable_hash(
        {
            "engine": ENGINE_VERSION,
            "tokenizer": files_digest(tokenizer_files(tokenizer_path)),
            "splits": {plan.spec.assign_split: 1.0} if plan.spec.assign_split else config.splits,
            "split_seed": config.split_seed,
        }
    )
    return plan.directory / f"tokens-{key}"


def prepare_source(
    spec: SourceSpec,
    tokenizer_path: Path,
    cache_dir: Path,
    config: PrepareConfig | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> PreparedSource:
    """Build (or reuse) the token shards of ``spec`` with the tokenizer at ``tokenizer_path`` (a
    sentencepiece ``.model`` file or a Hugging Face tokenizer directory, see
    :func:`lmexp.data.tokenizer.load_tokenizer`).

    ``rank`` of ``world_size`` preparing processes (see the module docstring); each starts
    ``config.workers`` worker processes. Returns when every unit is built and checked.
    """
    config = config or PrepareConfig()
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank} is not in [0, world_size={world_size})")
    plan = plan_source(spec, cache_dir, config)
    directory = token_directory(plan, tokenizer_path, config)
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / INDEX_FILE).is_file():
        try:
            return open_prepared(spec, tokenizer_path, cache_dir, config)
        except DataError as error:  # a damaged shard: its unit is rebuilt below
            log.warning("%s; rebuilding the damaged units", error)
            (directory / INDEX_FILE).unlink(missing_ok=True)
    _discard_damaged(plan, directory, config.verify)
    for _ in range(3):  # again if another process discarded a damaged unit meanwhile
        _run_workers(plan, directory, Path(tokenizer_path), config, rank, world_size)
        if all(entry is not None for entry in _read_entries(plan, directory)):
            break
    return _finish(plan, directory, Path(tokenizer_path), config)


def open_prepared(
    spec: SourceSpec, tokenizer_path: Path, cache_dir: Path, config: PrepareConfig | None = None
) -> PreparedSource:
    """The prepared source, read-only: :class:`DataError` if it is incomplete or a shard is damaged
    (:func:`prepare_source` rebuilds instead). For processes that only read, e.g. DDP ranks in setup()."""
    config = config or PrepareConfig()
    plan = plan_source(spec, cache_dir, config)
    directory = token_directory(plan, tokenizer_path, config)
    entries = _read_entries(plan, directory)
    missing = [unit.index for unit, entry in zip(plan.units, entries, strict=True) if entry is None]
    if missing:
        raise DataError(
            f"{spec.key}: {len(missing)} of {len(plan.units)} units are not prepared in {directory} "
            f"(first: {missing[0]}); run prepare_source first"
        )
    prepared = _prepared(plan, directory, entries)
    for entry in entries:
        for info in entry["shards"].values():
            problem = verify_shard(directory, ShardInfo.from_dict(info), prepared.eos_id, config.verify)
            if problem:
                raise DataError(
                    f"{directory}: shard {problem}; prepare again to rebuild it, or delete {directory}"
                )
    return prepared


def _prepared(plan: SourcePlan, directory: Path, entries: list[dict[str, Any]]) -> PreparedSource:
    first = entries[0]
    return PreparedSource(plan.spec, directory, entries, first["eos_id"], first["vocab_size"])


def _entry_path(directory: Path, index: int) -> Path:
    return directory / f"u{index:05d}.json"


def _read_entry(directory: Path, index: int) -> dict[str, Any] | None:
    """A unit's index entry, or None when it is absent or unreadable (the unit is then rebuilt)."""
    try:
        entry = json.loads(_entry_path(directory, index).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and entry.get("engine") == ENGINE_VERSION else None


def _read_entries(plan: SourcePlan, directory: Path) -> list[dict[str, Any] | None]:
    index_file = directory / INDEX_FILE
    if index_file.is_file():
        try:
            entries = json.loads(index_file.read_text(encoding="utf-8"))["entries"]
            if len(entries) == len(plan.units):
                return entries
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return [_read_entry(directory, unit.index) for unit in plan.units]


def _entry_problem(directory: Path, entry: dict[str, Any], level: str) -> str | None:
    for info in entry["shards"].values():
        if problem := verify_shard(directory, ShardInfo.from_dict(info), entry["eos_id"], level):
            return problem
    return None


def _discard_damaged(plan: SourcePlan, directory: Path, level: str) -> None:
    """Remove the index entries of units whose shards fail verification, so they are built again."""
    for unit in plan.units:
        entry = _read_entry(directory, unit.index)
        if entry is not None and (problem := _entry_problem(directory, entry, level)):
            with FileLock(str(directory / f"u{unit.index:05d}.lock")):
                log.warning("%s: unit %d is damaged (%s); rebuilding it", directory, unit.index, problem)
                _entry_path(directory, unit.index).unlink(missing_ok=True)


def _finish(plan: SourcePlan, directory: Path, tokenizer_path: Path, config: PrepareConfig) -> PreparedSource:
    """Check every unit, the source as a whole, and write ``index.json``."""
    entries = _read_entries(plan, directory)
    if any(entry is None for entry in entries):
        raise DataError(f"{plan.spec.key}: units are still missing in {directory} after preparation")
    prepared = _prepared(plan, directory, entries)
    for entry in entries:
        if problem := _entry_problem(directory, entry, config.verify):
            raise DataError(f"{directory}: shard {problem} right after it was built; check the disk")
    if sum(sum(s["n_documents"] for s in entry["shards"].values()) for entry in entries) == 0:
        raise DataError(
            f"{plan.spec.path_key}: {plan.spec.path} yields no documents; expected non-empty text"
        )
    index = {
        "engine": ENGINE_VERSION,
        "source": plan.spec.content_dict(),
        "tokenizer": str(tokenizer_path),
        "totals": {split: prepared.totals(split) for split in prepared.splits},
        "entries": entries,
    }
    atomic_write_json(directory / INDEX_FILE, index)  # identical from every process: the last rename wins
    return prepared


def _run_workers(
    plan: SourcePlan, directory: Path, tokenizer_path: Path, config: PrepareConfig, rank: int, world: int
) -> None:
    """Build the missing units with this process's workers (in this process when there is one)."""
    if all(_read_entry(directory, u.index) is not None for u in plan.units):
        return
    n_workers = min(config.resolved_workers(), max(1, len(plan.units)))
    job = {
        "plan": str(plan.directory / PLAN_FILE),
        "spec": asdict(plan.spec),
        "directory": str(directory),
        "tokenizer": str(tokenizer_path),
        "config": asdict(config),
        "rank": rank,
        "world_size": world,
        "n_workers": n_workers,
    }
    if n_workers == 1:
        build_units({**job, "worker": 0})
        return
    _run_subprocess_workers(job, directory, n_workers)


def _run_subprocess_workers(job: dict[str, Any], directory: Path, n_workers: int) -> None:
    """Start ``python -m lmexp.data.prepare --worker`` processes (light: no torch, no __main__ re-import)
    and wait for them; the first worker error is raised here and the other workers are stopped."""
    package_root = str(Path(__file__).resolve().parents[2])  # workers import this same lmexp
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
        "RAYON_NUM_THREADS": "1",  # a Hugging Face tokenizer's thread pool: one core per worker, too
    }
    with tempfile.TemporaryDirectory(prefix=".jobs-", dir=directory) as jobs:
        workers = []
        for worker in range(n_workers):
            job_file, result_file = Path(jobs) / f"job{worker}.json", Path(jobs) / f"result{worker}.json"
            job_file.write_text(json.dumps({**job, "worker": worker, "result": str(result_file)}))
            command = [sys.executable, "-m", "lmexp.data.prepare", "--worker", str(job_file)]
            workers.append((subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL), result_file))
        try:
            _wait_for(workers)
        finally:
            for process, _ in workers:
                if process.poll() is None:
                    process.kill()
                    process.wait()


def _wait_for(workers: list[tuple[subprocess.Popen, Path]]) -> None:
    pending = list(workers)
    while pending:
        for process, result_file in list(pending):
            code = process.poll()
            if code is None:
                continue
            pending.remove((process, result_file))
            if code != 0:
                _raise_worker_error(code, result_file)
        time.sleep(0.05)


def _raise_worker_error(code: int, result_file: Path) -> None:
    try:
        result = json.loads(result_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise RuntimeError(f"a preparation worker exited with status {code}; run again to resume") from None
    if "traceback" not in result:  # a user error (bad data, a full disk naming its shard): one line here too
        error_class = {"DataError": DataError, "ConfigError": ConfigError}.get(result.get("type"), UserError)
        raise error_class(result["message"])
    raise RuntimeError(f"a preparation worker failed: {result.get('traceback', result.get('message'))}")


# ----------------------------------------------------------------------------------------- workers
def unit_order(n_units: int, rank: int, world: int, worker: int, n_workers: int) -> list[int]:
    """The order in which one worker visits units: its share of its process's units (``u % world ==
    rank``, every ``n_workers``-th), the rest of them, then every other process's units from an offset
    of its own; so workers and processes start on different units and meet only to take over work."""
    own = [u for u in range(n_units) if u % world == rank]
    mine = own[worker::n_workers]  # this worker's share of its process's units, then the rest of them
    own = mine + [u for u in own if u not in set(mine)]
    start = (rank * n_workers + worker) * max(1, n_units // max(1, world * n_workers))
    others = [u for u in range(n_units) if u % world != rank]
    others = others[start % len(others) :] + others[: start % len(others)] if others else others
    return own + others


def build_units(job: dict[str, Any]) -> list[int]:
    """A worker's loop: build every unit that has no entry, each under its lock; returns those built.

    Units whose lock is held by another builder are skipped and revisited; when only such units are
    left, the worker polls them every 0.1 s, so it returns only once every unit has an entry.
    """
    from lmexp.data.tokenizer import load_tokenizer

    plan = json.loads(Path(job["plan"]).read_text(encoding="utf-8"))
    units = [Unit(**unit) for unit in plan["units"]]
    spec = SourceSpec(**job["spec"])
    config = PrepareConfig(**job["config"])
    directory = Path(job["directory"])
    tokenizer = load_tokenizer(Path(job["tokenizer"]), num_threads=1)  # one core per worker
    context = _BuildContext(spec, config, directory, tokenizer)
    built: list[int] = []
    pending = unit_order(len(units), job["rank"], job["world_size"], job["worker"], job["n_workers"])
    while pending:
        progress = False
        for index in list(pending):
            if _read_entry(directory, index) is not None:
                pending.remove(index)
                continue
            lock = FileLock(str(directory / f"u{index:05d}.lock"))
            try:
                lock.acquire(timeout=0)  # held: someone is building it; come back later
            except Timeout:
                continue
            try:
                if _read_entry(directory, index) is None:  # another builder may have finished it
                    context.build(units[index])
                    built.append(index)
                pending.remove(index)
                progress = True
            finally:
                lock.release()
        if pending and not progress:
            time.sleep(0.1)  # every remaining unit is being built by someone else
    return built


class _BuildContext:
    """What a worker keeps between units: the source, the tokenizer and the split rule."""

    def __init__(self, spec: SourceSpec, config: PrepareConfig, directory: Path, tokenizer: Any) -> None:
        self.spec, self.config, self.directory, self.tokenizer = spec, config, directory, tokenizer
        self.rule = SplitRule(config.splits, config.split_seed, spec.assign_split)
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.dataset = open_hf_dataset(spec) if is_hf_source(spec) else None

    def build(self, unit: Unit) -> None:
        """Tokenize one unit into its shards and write its entry last."""
        start = time.perf_counter()
        prefix = f"u{unit.index:05d}."
        for leftover in self.directory.glob(f".{prefix}*tmp"):  # of a build killed half-way; we hold the lock
            leftover.unlink(missing_ok=True)
        writers = {
            split: ShardWriter(
                self.directory, prefix + split, self.dtype, self.tokenizer.eos_id, unit.index == 0
            )
            for split in self.rule.names
        }
        try:
            for documents in _chunks(read_unit(unit, self.spec, self.dataset), self.config.chunk_bytes):
                self._add(documents, writers)
            shards = {split: writer.finish().as_dict() for split, writer in writers.items()}
        except BaseException as error:
            for writer in writers.values():
                writer.abort()
            if is_storage_failure(error):  # a full disk or a size limit: one line naming the shard directory
                raise StorageError(error.filename or self.directory / f"{prefix}*", error) from error
            raise
        seconds = time.perf_counter() - start
        entry = {
            "engine": ENGINE_VERSION,
            "unit": asdict(unit),
            "shards": shards,
            "eos_id": self.tokenizer.eos_id,
            "vocab_size": self.tokenizer.vocab_size,
            "seconds": round(seconds, 3),
            "built_by": f"{socket.gethostname()}:{os.getpid()}",
        }
        atomic_write_json(_entry_path(self.directory, unit.index), entry)
        _append_line(
            self.directory / BUILDS_LOG,
            {"unit": unit.index, "by": entry["built_by"], "seconds": entry["seconds"]},
        )

    def _add(self, documents: list[str], writers: dict[str, ShardWriter]) -> None:
        encoded = [document.encode("utf-8") for document in documents]
        ids = self.tokenizer.encode(documents)
        by_split: dict[str, tuple[list, list, list]] = {split: ([], [], []) for split in writers}
        for document, data, tokens in zip(documents, encoded, ids, strict=True):
            group = by_split[self.rule(data)]
            group[0].append(tokens)
            group[1].append(len(data))
            group[2].append(len(document.split()))
        for split, (split_ids, n_bytes, n_words) in by_split.items():
            writers[split].add(split_ids, n_bytes, n_words)


def _chunks(documents: Iterator[str], chunk_chars: int) -> Iterator[list[str]]:
    """Consecutive lists of documents of about ``chunk_chars`` characters each."""
    chunk: list[str] = []
    size = 0
    for document in documents:
        chunk.append(document)
        size += len(document)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line with a single write (O_APPEND), so concurrent builders never interleave."""
    data = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_builds_log(directory: Path) -> list[dict[str, Any]]:
    """The records of ``builds.log``: one per unit build, with who built it and how long it took."""
    path = Path(directory) / BUILDS_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _worker_main(job_file: Path) -> int:
    """Entry point of a worker process: build units, report the outcome in the job's result file."""
    job = json.loads(job_file.read_text(encoding="utf-8"))
    result_file = Path(job["result"])
    try:
        built = build_units(job)
    except UserError as error:
        result_file.write_text(json.dumps({"type": type(error).__name__, "message": str(error)}))
        return 1
    except Exception as error:  # noqa: BLE001 - reported to the parent with its traceback
        result_file.write_text(
            json.dumps(
                {"type": type(error).__name__, "message": str(error), "traceback": traceback.format_exc()}
            )
        )
        return 1
    result_file.write_text(json.dumps({"built": built}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmexp.data.prepare", description="a preparation worker")
    parser.add_argument("--worker", type=Path, required=True, help="the job file written by prepare_source")
    args = parser.parse_args(argv)
    return _worker_main(args.worker)


if __name__ == "__main__":
    raise SystemExit(main())
