"""Full disks, file-size limits and read-only places: the previous file stays whole, one line names the file.

The size limit is RLIMIT_FSIZE (what ``ulimit -f`` sets; Python ignores SIGXFSZ, so a write over it fails
with EFBIG). A full disk and a read-only place are small tmpfs mounts (root only, as CI runs; skipped
elsewhere).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import logging
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmexp.cache import atomic_write_text
from lmexp.errors import StorageError
from lmexp.train import train
from lmexp.training.checkpoints import AtomicCheckpointIO, checkpoint_step, load_checkpoint
from lmexp.training.csv_log import _append_rows
from tests.conftest import REPO, make_config


@contextlib.contextmanager
def file_size_limit(n_bytes: int) -> Iterator[None]:
    """``ulimit -f`` for this process, for the body."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@contextlib.contextmanager
def tmpfs(where: Path, *options: str) -> Iterator[Path]:
    """A small tmpfs mounted at ``where`` for the body; skips the test where mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_write_over_the_size_limit_keeps_the_previous_file(tmp_path):
    target = tmp_path / "meta.json"
    target.write_text("previous")
    with file_size_limit(1000), pytest.raises(StorageError) as info:
        atomic_write_text(target, "x" * 5000)
    assert target.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["meta.json"]
    assert str(info.value).startswith(
        f"cannot write {target}: the file would exceed the file-size limit (EFBIG"
    )


def test_a_checkpoint_over_the_size_limit_keeps_the_previous_checkpoint(tmp_path):
    last = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, last)
    before = last.read_bytes()
    with (
        file_size_limit(len(before) + 1000),
        pytest.raises(StorageError, match=f"cannot write {last}: .*EFBIG"),
    ):
        AtomicCheckpointIO().save_checkpoint(
            {"weights": torch.zeros(10_000)}, last
        )  # torch: "unexpected pos"
    assert last.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_csv_append_over_the_size_limit_is_cut_back_to_the_previous_rows(tmp_path):
    log = tmp_path / "metrics.csv"
    log.write_text("step,loss\n1,2.0\n")
    rows = [{"step": s, "loss": 1.0} for s in range(2, 200)]
    with file_size_limit(log.stat().st_size + 100), pytest.raises(StorageError, match=f"cannot write {log}"):
        _append_rows(log, ["step", "loss"], rows)
    assert log.read_text() == "step,loss\n1,2.0\n"
    assert list(csv.DictReader(log.open())) == [{"step": "1", "loss": "2.0"}]


def test_a_full_disk_and_a_read_only_place(tmp_path):
    with tmpfs(tmp_path / "small", "size=64k") as small:
        target = small / "tokens.json"
        target.write_text("previous")
        with pytest.raises(
            StorageError, match=f"cannot write {target}: no space left on the device .ENOSPC"
        ) as info:
            atomic_write_text(target, "x" * 200_000)
        assert info.value.errno == errno.ENOSPC and target.read_text() == "previous"
        assert [p.name for p in small.iterdir()] == ["tokens.json"]  # the temporary file is gone too
    with tmpfs(tmp_path / "ro", "ro,size=64k") as read_only:
        with pytest.raises(StorageError, match="the file system is read-only .EROFS."):
            atomic_write_text(read_only / "run" / "metrics.json", "{}")


SMALL = ["debug=fast", "logger=[csv]", "callbacks.progress_bar=null", "callbacks.model_summary=null"]
EVERY_2 = ["callbacks.checkpoint.every_n_train_steps=2", "trainer.val_check_interval=100"]


@pytest.mark.slow
def test_a_checkpoint_write_over_the_size_limit_stops_in_one_line_and_resume_auto_continues(
    tmp_path, cache_dir, caplog
):
    run_dir = tmp_path / "run"
    train(make_config(run_dir, cache_dir, *SMALL, *EVERY_2, "trainer.max_steps=4", tiny=False))
    last = run_dir / "checkpoints" / "last.ckpt"
    good = last.read_bytes()
    limit = len(good) // 2  # the CSV log and Hydra's files stay far below it

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    command = [sys.executable, "-m", "lmexp.train", *SMALL, *EVERY_2, "trainer.max_steps=8"]
    result = subprocess.run(
        [*command, f"hydra.run.dir={run_dir}"],
        env={**os.environ, "LMEXP_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(REPO)},
        cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=limited,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"cannot write {run_dir}/checkpoints/" in lines[0] and "file-size limit (EFBIG" in lines[0]
    assert last.read_bytes() == good and not list(last.parent.glob(".*.tmp"))  # the previous one, whole

    caplog.set_level(logging.INFO, logger="lmexp.training.resume")
    train(make_config(run_dir, cache_dir, *SMALL, *EVERY_2, "trainer.max_steps=8", "resume=auto", tiny=False))
    assert f"resume=auto: continuing from {last} (step 4)" in caplog.text
    assert checkpoint_step(load_checkpoint(last)) == 8


def test_token_shards_over_the_size_limit_are_one_line_and_leave_nothing(tmp_path):
    from lmexp.data.engine import prepare_corpus
    from lmexp.data.prepare import PrepareConfig
    from lmexp.data.sources import SourceSpec
    from lmexp.data.tokenizer import TokenizerConfig
    from tests.data.engine_helpers import make_documents

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(make_documents(4000)) + "\n", encoding="utf-8")
    source = SourceSpec("text", str(corpus))
    config = PrepareConfig(splits={"train": 0.9, "val": 0.05, "test": 0.05}, workers=0)
    cache = tmp_path / "cache"
    # The limit is above the tokenizer model (~250 kB) and the cache records, below the train shard (~650 kB).
    with file_size_limit(400_000), pytest.raises(StorageError, match=r"cannot write .*EFBIG"):
        prepare_corpus([source], TokenizerConfig(vocab_size=300), cache, config)
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]
    assert not list(cache.rglob("*.bin"))  # no shard in place: the next run builds them whole


@pytest.mark.slow
def test_a_read_only_output_dir_is_one_line_through_the_cli(tmp_path, cli):
    with tmpfs(tmp_path / "ro", "ro,size=64k") as read_only:
        result = cli("lmexp.train", "debug=fast", f"hydra.run.dir={read_only}/run", timeout=120, forked=True)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"error: cannot write {read_only}/run") and "read-only (EROFS)" in lines[0]
