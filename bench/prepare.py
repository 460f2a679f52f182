"""Prepare: corpus preparation throughput and peak memory, lmexp's data engine against the common recipe.

The peer is what most projects do (nanoGPT's ``data/openwebtext/prepare.py``, with a Hugging Face fast
tokenizer): ``datasets.load_dataset("json")`` converts the file to Arrow, ``Dataset.map(batched=True,
num_proc=cores)`` tokenizes it (appending eos to each document), and the ids are copied into one
``np.memmap`` in 1,024 contiguous shards. Its tokenizer is lmexp's sentencepiece model rebuilt as a
``PreTrainedTokenizerFast`` (:func:`lmexp.export.hf_tokenizer`), so both sides produce the same ids. lmexp's
side is :func:`lmexp.data.prepare.prepare_source` with one worker per core, writing train/val/test shards.

Each side runs in a fresh child process (``python -m bench.prepare <side> ...``) on the same JSONL file,
with caches in a fresh temporary directory; the parent samples the process tree every 50 ms for the peak
of its summed RSS (and of its anonymous part, RSS minus file-backed pages: Arrow's memory-mapped files
count in RSS but the kernel can drop them). Throughput is the file's size in MB (10^6 bytes) per second
of the child's wall time, start-up included.

Also measured: lmexp's peak memory and seconds per MB at three corpus sizes, and 1 against 2 preparing
processes (``rank`` 0 and 1 of 2, one worker each, as two DDP ranks or SLURM tasks would split the work).

Corpora: the built-in generator's documents (``bench/out/corpus-50mb.txt``, as bench/data.py makes it),
repeated with each copy perturbed (sentences rotated, documents reordered) up to the size, written once
to ``bench/out/prepare-<size>mb.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import Result

OUT = Path(__file__).resolve().parent / "out"
ROOT = Path(__file__).resolve().parent.parent
SIZES_MB, COMPARE_MB, PROCESSES_MB = (100, 400, 1600), 100, 100
SMOKE_SIZES_MB, SMOKE_COMPARE_MB, SMOKE_PROCESSES_MB = (1, 2), 1, 1
VOCAB_SIZE, SMOKE_VOCAB_SIZE = 8000, 1000
SAMPLE_SECONDS = 0.05


# ------------------------------------------------------------------------------------------ corpora
def base_documents(smoke: bool) -> list[str]:
    """The documents of bench/data.py's generated corpus (50 MB, or 1 MB for smoke runs)."""
    from bench.data import CORPUS_MB, SMOKE_CORPUS_MB, corpus_lines

    megabytes = SMOKE_CORPUS_MB if smoke else CORPUS_MB
    corpus_lines(megabytes)  # generates the file once
    text = (OUT / f"corpus-{megabytes}mb.txt").read_text(encoding="utf-8")
    return [document for document in text.split("\n\n") if document.strip()]


def _perturbed(document: str, copy: int) -> str:
    """Copy ``copy`` of a document: its sentences rotated by ``copy`` (copy 0 is the document itself)."""
    sentences = document.split(". ")
    shift = copy % len(sentences)
    return ". ".join(sentences[shift:] + sentences[:shift])


def corpus_file(megabytes: int, documents: list[str]) -> Path:
    """A JSONL corpus of at least ``megabytes`` MB built from ``documents`` (written once, then reused)."""
    path = OUT / f"prepare-{megabytes}mb.jsonl"
    if path.is_file():
        return path
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    size, copy = 0, 0
    with open(tmp, "w", encoding="utf-8") as out:
        while size < megabytes * 1_000_000:
            order = list(range(len(documents)))
            random.Random(copy).shuffle(order)
            for i in order:
                line = json.dumps({"text": _perturbed(documents[i], copy)}) + "\n"
                out.write(line)
                size += len(line.encode("utf-8"))
                if size >= megabytes * 1_000_000:
                    break
            copy += 1
    os.replace(tmp, path)
    return path


def tokenizer_files(documents: list[str], vocab_size: int, directory: Path) -> tuple[Path, Path]:
    """lmexp's sentencepiece model trained on 200,000 of the documents, and the same as an HF tokenizer."""
    from lmexp.data.tokenizer import TokenizerConfig, train_or_load_tokenizer
    from lmexp.inference.export import hf_tokenizer

    tokenizer = train_or_load_tokenizer(
        documents[:200_000],
        f"bench-prepare-{len(documents)}",
        TokenizerConfig(vocab_size=vocab_size),
        directory,
    )
    hf_dir = directory / "hf-tokenizer"
    hf_tokenizer(tokenizer.path, bert=False, max_length=None).save_pretrained(str(hf_dir))
    return tokenizer.path, hf_dir


# ------------------------------------------------------------------------------------- measuring
class TreeMemory:
    """Peak summed RSS (and RSS minus file-backed pages) of a process and all its descendants."""

    def __init__(self, pid: int) -> None:
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid)
        self.peak_rss = self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        psutil = self._psutil
        while not self._stop.is_set():
            rss = anon = 0
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                processes = []
            for process in processes:
                try:
                    info = process.memory_info()
                except psutil.Error:
                    continue
                rss += info.rss
                anon += info.rss - info.shared
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
            self._stop.wait(SAMPLE_SECONDS)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_sides(commands: list[list[str]]) -> dict[str, Any]:
    """Run child commands at once; their wall seconds (until the last ends) and their summed peaks."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    cpu_before = _children_cpu()
    start = time.perf_counter()
    children = [
        subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    monitors = [TreeMemory(child.pid) for child in children]
    outputs = [child.communicate() for child in children]
    seconds = time.perf_counter() - start
    for monitor in monitors:
        monitor.stop()
    reports = []
    for child, (out, err) in zip(children, outputs, strict=True):
        if child.returncode != 0:
            raise RuntimeError(f"{' '.join(child.args[:4])} failed: {err.strip().splitlines()[-3:]}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return {
        "seconds": seconds,
        "cpu_seconds": _children_cpu() - cpu_before,
        "peak_rss": sum(m.peak_rss for m in monitors),
        "peak_anon": sum(m.peak_anon for m in monitors),
        "reports": reports,
    }


def _children_cpu() -> float:
    """User + system CPU seconds of every finished descendant (workers roll up into their waited-for
    parents): less sensitive than wall time to other jobs sharing the cores."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _side(side: str, corpus: Path, tokenizer: Path, work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bench.prepare", side, str(corpus), str(tokenizer), str(work), *extra]


def lmexp_run(corpus: Path, model: Path, workers: int, scratch: Path, ranks: int = 1) -> dict[str, Any]:
    """lmexp's engine in ``ranks`` processes of ``workers`` workers each, in a fresh cache."""
    work = Path(tempfile.mkdtemp(prefix="lmexp-", dir=scratch))
    try:
        commands = [
            _side("lmexp", corpus, model, work, str(workers), str(r), str(ranks)) for r in range(ranks)
        ]
        return run_sides(commands)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def peer_run(corpus: Path, hf_dir: Path, num_proc: int, scratch: Path) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="peer-", dir=scratch))
    try:
        return run_sides([_side("peer", corpus, hf_dir, work, str(num_proc))])
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------ the sides
def lmexp_side(corpus: Path, model: Path, work: Path, workers: int, rank: int, world: int) -> dict[str, Any]:
    from lmexp.data.prepare import PrepareConfig, prepare_source
    from lmexp.data.sources import SourceSpec

    prepared = prepare_source(
        SourceSpec("bench", str(corpus)), model, work, PrepareConfig(workers=workers), rank, world
    )
    tokens = sum(prepared.totals(split)["n_tokens"] for split in prepared.splits)
    return {"tokens": tokens, "units": len(prepared.entries)}


def peer_side(corpus: Path, tokenizer_path: Path, work: Path, num_proc: int) -> dict[str, Any]:
    """nanoGPT's prepare.py with datasets.map(batched=True): with the HF fast tokenizer saved at
    ``tokenizer_path`` (a directory), or with lmexp's sentencepiece model (a ``.model`` file)."""
    import numpy as np
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    encode, eos = _peer_encoder(tokenizer_path)
    dataset = load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(work / "hf"))

    def process(batch: dict[str, list]) -> dict[str, list]:
        ids = [row + [eos] for row in encode(batch["text"])]
        return {"ids": ids, "len": [len(row) for row in ids]}

    tokenized = dataset.map(process, batched=True, remove_columns=["text"], num_proc=num_proc)
    total = int(np.sum(tokenized["len"], dtype=np.uint64))
    stream = np.memmap(work / "train.bin", dtype=np.uint16, mode="w+", shape=(total,))
    position, n_shards = 0, 1024
    for index in range(n_shards):
        shard = tokenized.shard(num_shards=n_shards, index=index, contiguous=True).with_format("numpy")
        ids = np.concatenate(shard["ids"])
        stream[position : position + len(ids)] = ids
        position += len(ids)
    stream.flush()
    return {"tokens": total}


class _SentencePieceEncoder:
    """Picklable for datasets.map's worker processes: each loads the model file on first use."""

    def __init__(self, path: Path) -> None:
        self.path, self._processor = str(path), None

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self._processor is None:
            import sentencepiece

            self._processor = sentencepiece.SentencePieceProcessor(model_file=self.path)
        return self._processor.encode(texts)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_processor": None}


def _peer_encoder(tokenizer_path: Path) -> tuple[Any, int]:
    if tokenizer_path.suffix == ".model":
        from lmexp.data.tokenizer import EOS_ID

        return _SentencePieceEncoder(tokenizer_path), EOS_ID
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_path))

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    return encode, tokenizer.eos_token_id


def _child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prepare")
    parser.add_argument("side", choices=("lmexp", "peer"))
    parser.add_argument("corpus", type=Path)
    parser.add_argument("tokenizer", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("numbers", type=int, nargs="+")
    args = parser.parse_args(argv)
    if args.side == "lmexp":
        report = lmexp_side(args.corpus, args.tokenizer, args.work, *args.numbers)
    else:
        report = peer_side(args.corpus, args.tokenizer, args.work, *args.numbers)
    print(json.dumps(report))
    return 0


# ---------------------------------------------------------------------------------------- suite
def run(smoke: bool = False, overrides: list[str] | None = None) -> list[Result]:
    sizes = SMOKE_SIZES_MB if smoke else SIZES_MB
    compare_mb = SMOKE_COMPARE_MB if smoke else COMPARE_MB
    processes_mb = SMOKE_PROCESSES_MB if smoke else PROCESSES_MB
    vocab_size = SMOKE_VOCAB_SIZE if smoke else VOCAB_SIZE
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    documents = base_documents(smoke)
    files = {mb: corpus_file(mb, documents) for mb in {*sizes, compare_mb, processes_mb}}
    megabytes = {mb: path.stat().st_size / 1e6 for mb, path in files.items()}
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-prepare-", dir=OUT) as scratch_name:
        scratch = Path(scratch_name)
        model, hf_dir = tokenizer_files(documents, vocab_size, scratch)
        del documents
        compare = files[compare_mb]
        # peer, lmexp, peer with sentencepiece: lmexp never runs first, on the coldest page cache
        runs["peer"] = peer_run(compare, hf_dir, cores, scratch)
        runs["lmexp"] = lmexp_run(compare, model, cores, scratch)
        runs["peer_sp"] = peer_run(compare, model, cores, scratch)
        for mb in sizes:
            runs[f"size_{mb}"] = (
                runs["lmexp"] if mb == compare_mb else lmexp_run(files[mb], model, cores, scratch)
            )
        runs["one"] = lmexp_run(files[processes_mb], model, 1, scratch, ranks=1)
        runs["two"] = lmexp_run(files[processes_mb], model, 1, scratch, ranks=2)
        runs["parallelism"] = machine_parallelism(1.0 if smoke else 10.0)
    setting = (
        f"sentencepiece BPE vocab {vocab_size}, {cores} cores, one run each (fresh child process and cache)"
    )
    return [
        *_comparison(runs, megabytes[compare_mb], setting),
        *_scaling(runs, {mb: megabytes[mb] for mb in sizes}, cores),
        _processes(runs, megabytes[processes_mb]),
    ]


def _comparison(runs: dict[str, Any], size: float, setting: str) -> list[Result]:
    ours, peer, peer_sp = runs["lmexp"], runs["peer"], runs["peer_sp"]
    tokens = [run["reports"][0]["tokens"] for run in (ours, peer, peer_sp)]
    notes = [
        f"{size:.0f} MB JSONL of generated documents; {setting}",
        f"tokens: lmexp {tokens[0]:,} (train/val/test, one leading eos each), peer {tokens[1]:,}, "
        f"peer with sentencepiece {tokens[2]:,}",
    ]

    def speeds(run: dict[str, Any]) -> dict[str, float]:
        return {"mb_per_sec": size / run["seconds"], "mb_per_cpu_sec": size / run["cpu_seconds"]}

    values = {f"{side}_{k}": v for side, run in runs.items() if side in ("lmexp", "peer", "peer_sp")
              for k, v in speeds(run).items()}  # fmt: skip
    ratio = peer["seconds"] / ours["seconds"]
    mib = 2**20
    return [
        Result(
            name="prepare/throughput",
            values=values,
            ratio=ratio,
            ratio_meaning="lmexp / peer (datasets.map, HF fast tokenizer, np.memmap) MB/s",
            goal=">= 1.0",
            met=ratio >= 1.0,
            notes=[
                *notes,
                "peer_sp: the peer's recipe with lmexp's sentencepiece model in map (lmexp's tokenizer)",
                "*_mb_per_cpu_sec: MB per CPU second of the whole process tree (robust to other jobs)",
            ],
        ),
        Result(
            name="prepare/peak_memory",
            values={
                "lmexp_peak_rss_mib": ours["peak_rss"] / mib,
                "peer_peak_rss_mib": peer["peak_rss"] / mib,
                "peer_sp_peak_rss_mib": peer_sp["peak_rss"] / mib,
                "lmexp_peak_anon_mib": ours["peak_anon"] / mib,
                "peer_peak_anon_mib": peer["peak_anon"] / mib,
            },
            ratio=ours["peak_rss"] / peer["peak_rss"],
            ratio_meaning="lmexp / peer peak RSS of the process tree",
            goal="<= 0.5",
            met=ours["peak_rss"] <= 0.5 * peer["peak_rss"],
            notes=[*notes, "anon: RSS minus file-backed and shared pages, summed over the tree"],
        ),
    ]


def _scaling(runs: dict[str, Any], megabytes: dict[int, float], cores: int) -> list[Result]:
    by_size = {mb: runs[f"size_{mb}"] for mb in megabytes}
    smallest, largest = min(by_size), max(by_size)
    per_mb = {mb: run["seconds"] / megabytes[mb] for mb, run in by_size.items()}
    cpu_per_mb = {mb: run["cpu_seconds"] / megabytes[mb] for mb, run in by_size.items()}
    peaks = {mb: run["peak_rss"] / 2**20 for mb, run in by_size.items()}
    values = {f"sec_per_mb_{mb}mb": per_mb[mb] for mb in by_size}
    values |= {f"cpu_sec_per_mb_{mb}mb": cpu_per_mb[mb] for mb in by_size}
    values |= {f"peak_rss_mib_{mb}mb": peaks[mb] for mb in by_size}
    sizes = ", ".join(f"{megabytes[mb]:.0f}" for mb in by_size)
    return [
        Result(
            name="prepare/scaling",
            values=values,
            ratio=per_mb[largest] / per_mb[smallest],
            ratio_meaning=f"lmexp seconds per MB at {largest} MB / at {smallest} MB",
            goal="<= 1.0",
            met=per_mb[largest] <= per_mb[smallest],
            notes=[f"sizes {sizes} MB, {cores} workers, one run each"],
        ),
        Result(
            name="prepare/peak_by_size",
            values={"max_peak_rss_mib": max(peaks.values())},
            ratio=max(peaks.values()) / 1536,
            ratio_meaning="lmexp's largest peak RSS over the sizes / 1.5 GiB",
            goal="< 1.0",
            met=max(peaks.values()) < 1536,
            notes=[f"sizes {sizes} MB"],
        ),
    ]


def _processes(runs: dict[str, Any], size: float) -> Result:
    one, two = runs["one"], runs["two"]
    return Result(
        name="prepare/processes",
        values={
            "one_process_sec": one["seconds"],
            "two_processes_sec": two["seconds"],
            "one_process_cpu_sec": one["cpu_seconds"],
            "two_processes_cpu_sec": two["cpu_seconds"],
            "machine_parallelism": runs["parallelism"],
        },
        ratio=one["seconds"] / two["seconds"],
        ratio_meaning="lmexp wall time, 1 process / 2 processes (rank 0 and 1 of 2), one worker each",
        goal="close to 2 (>= 1.8)",
        met=one["seconds"] / two["seconds"] >= 1.8,
        notes=[
            f"{size:.0f} MB; the two processes share the units through file locks",
            "machine_parallelism: CPU seconds two busy loops get together / one alone, measured right after; "
            "below ~1.8 the machine cannot run two processes at once and no ratio can reach 2",
        ],
    )


def machine_parallelism(seconds: float) -> float:
    """CPU seconds two concurrent busy-loop processes get together, over what one gets alone: about 2 on
    two free cores, about 1 when other jobs leave this benchmark a fixed share of the machine."""
    loop = (
        "import resource, time\n"
        f"end = time.time() + {seconds}\n"
        "while time.time() < end: pass\n"
        "r = resource.getrusage(resource.RUSAGE_SELF); print(r.ru_utime + r.ru_stime)"
    )

    def cpu_of(n: int) -> float:
        loops = [
            subprocess.Popen([sys.executable, "-c", loop], stdout=subprocess.PIPE, text=True)
            for _ in range(n)
        ]
        return sum(float(process.communicate()[0]) for process in loops)

    return cpu_of(2) / cpu_of(1)


if __name__ == "__main__":
    raise SystemExit(_child(sys.argv[1:]))
