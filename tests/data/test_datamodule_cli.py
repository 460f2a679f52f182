"""Real data end to end, through the real CLI: a mixture of a compressed JSONL file, a Parquet file and the
built-in corpus with document masking (bpb and per-source metrics in metrics.json, the summary, lmexp.eval),
a Chinese corpus (bpb falls, generation with an unquoted Chinese prompt), and ``python -m lmexp.prepare``
split between two processes and killed mid-way. Tiny models and corpora: each run takes seconds."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmexp.data.corpus import GrammarConfig, build_grammar, generate_documents
from lmexp.data.prepare import read_builds_log

TINY = ["debug=fast", "logger=csv", "callbacks.progress_bar=null", "callbacks.model_summary=null"]


def run(
    module: str, *args: str, cwd: Path, cache: Path, timeout: int = 300, **popen
) -> subprocess.CompletedProcess:
    """``python -m module args`` as a user runs it, caching into ``cache``."""
    env = {**os.environ, "LMEXP_CACHE_DIR": str(cache), "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def english(n: int, seed: int) -> list[str]:
    return generate_documents(build_grammar(GrammarConfig()), n, seed=seed)


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("mixture")
    with gzip.open(root / "web.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"text": doc}) + "\n" for doc in english(300, seed=5))
    pq.write_table(pa.table({"body": english(300, seed=6)}), root / "books.parquet", row_group_size=100)
    result = run(
        "lmexp.train", *TINY, "data=mixture", "data.sources.text.path=web.jsonl.gz",
        "+data.sources.books.path=books.parquet", "+data.sources.books.text_field=body",
        "+data.sources.books.weight=2", "data.document_mask=true", "hydra.run.dir=run",
        cwd=root, cache=root / "cache",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return root, root / "run", result


@pytest.mark.slow
def test_mixture_reports_bpb_overall_and_per_source(mixture_run) -> None:
    _, run_dir, result = mixture_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for split in ("val", "test"):
        assert {f"{split}/loss", f"{split}/bpb", f"{split}/bpw"} <= set(metrics)
        for source in ("builtin", "text", "books"):
            assert {f"{split}/{source}/loss", f"{split}/{source}/bpb"} <= set(metrics), sorted(metrics)
        parts = sum(metrics[f"{split}/{s}/tokens"] for s in ("builtin", "text", "books"))
        assert parts == metrics[f"{split}/tokens"]  # every scored block belongs to exactly one source
    assert 0 < metrics["val/bpb"] < 8
    out = " ".join(result.stdout.split())
    assert "val bits per byte" in out and "val bits per byte: books" in out
    assert "val metrics: trainer.limit_val_batches=4 of the val split" in out
    assert "Epoch 0/-" not in result.stdout + result.stderr


@pytest.mark.slow
def test_eval_of_a_language_model_checkpoint_reports_bpb(mixture_run) -> None:
    root, run_dir, _ = mixture_run
    result = run("lmexp.eval", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "hydra.run.dir=eval",
                 cwd=root, cache=root / "cache")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert 0 < metrics["test/bpb"] < 8 and "test/loss" in metrics


# A few dozen short sentences about language models, written for this test, recombined into documents.
CHINESE = (
    "大语言模型是一种神经网络。它从大量文本中学习语言的规律。模型读入一段文字，预测下一个词。"
    "训练时，我们把文本切成词元。词元可以是一个字，也可以是几个字。注意力机制让每个词元看到前面的词元。"
    "模型越大，需要的数据越多。验证集用来检查模型是否过拟合。学习率太大，训练就会不稳定。"
    "我们用每字节比特数比较不同的分词器。中文没有空格，所以按词计算没有意义。生成文本时，模型一次写一个词元。"
    "温度越高，生成的文字越多样。好的数据比大的模型更重要。今天我们训练一个很小的模型。它只有一层。"
).split("。")


def chinese_documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    sentences = [s for s in CHINESE if s]
    return ["。".join(rng.sample(sentences, rng.randint(3, 6))) + "。" for _ in range(n)]


@pytest.mark.slow
def test_chinese_corpus_trains_reports_falling_bpb_and_generates(tmp_path: Path) -> None:
    (tmp_path / "zh.txt").write_text("\n\n".join(chinese_documents(400)) + "\n", encoding="utf-8")
    result = run(
        "lmexp.train", *TINY, "data=text", "data.path=zh.txt",
        "trainer.max_steps=30", "trainer.val_check_interval=10", "optim.lr=3e-3", "hydra.run.dir=run",
        cwd=tmp_path, cache=tmp_path / "cache",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "val/bpb" in metrics and "test/bpb" in metrics
    assert "val/bpw" not in metrics  # no spaces: a "word" would be a whole line
    import csv

    with open(tmp_path / "run" / "csv" / "metrics.csv") as handle:
        bpb = [float(row["val/bpb"]) for row in csv.DictReader(handle) if row.get("val/bpb")]
    assert len(bpb) >= 3 and bpb[-1] < bpb[0] * 0.9, bpb  # falls as it learns
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    generated = run("lmexp.generate", f"ckpt_path={ckpt}", "prompt=大语言模型", "max_new_tokens=12",
                    cwd=tmp_path, cache=tmp_path / "cache")  # fmt: skip
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert "大语言模型" in generated.stdout
    unreadable = run(
        "lmexp.generate", f"ckpt_path={ckpt}", "prompt=[大语言,模型", cwd=tmp_path, cache=tmp_path
    )
    lines = [line for line in unreadable.stderr.splitlines() if line.strip()]
    assert unreadable.returncode != 0 and len(lines) == 1 and "quote" in lines[0], unreadable.stderr


@pytest.mark.slow
def test_prepare_shared_by_two_processes_then_killed_and_rerun(tmp_path: Path) -> None:
    docs = english(800, seed=9)
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    common = ["data=text", "data.path=corpus.txt", "data.unit_bytes=16384", "data.prepare_workers=1",
              "tokenizer.vocab_size=400"]  # fmt: skip
    env = {**os.environ, "LMEXP_CACHE_DIR": str(tmp_path / "cache")}
    processes = [
        subprocess.Popen([sys.executable, "-m", "lmexp.prepare", *common, f"rank={rank}", "world_size=2"],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]  # fmt: skip
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert "as process 1 of 2" in outputs[1][0] and "train" in outputs[1][0]
    (log,) = (tmp_path / "cache").rglob("builds.log")
    units = [build["unit"] for build in read_builds_log(log.parent)]
    assert sorted(units) == list(range(len(units))) and len(units) >= 4  # each unit built exactly once

    # Killed with -9 mid-way, workers too (a new tokenizer: new shards), then run again: it finishes the rest.
    args = [sys.executable, "-m", "lmexp.prepare", *common, "tokenizer.vocab_size=420"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    killed = subprocess.Popen(args, cwd=tmp_path, env=env, start_new_session=True, **quiet)
    deadline = time.monotonic() + 120
    while killed.poll() is None and time.monotonic() < deadline:
        if any(
            len(read_builds_log(p.parent)) >= 2 for p in (tmp_path / "cache").rglob("builds.log") if p != log
        ):
            break
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)  # the process group: lmexp.prepare and its worker processes
    killed.wait()
    again = run("lmexp.prepare", *common, "tokenizer.vocab_size=420", cwd=tmp_path, cache=tmp_path / "cache")
    assert again.returncode == 0, again.stderr[-2000:]
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".tmp" in p.name]


@pytest.mark.slow
def test_hf_dataset_saved_to_disk_prepares_through_the_cli(tmp_path: Path) -> None:
    from datasets import Dataset

    Dataset.from_dict({"content": english(300, seed=11)}).save_to_disk(str(tmp_path / "saved"))
    args = ["data=hf", "data.hf.path=saved", "data.text_field=content", "tokenizer.vocab_size=400"]
    hf_cache = {"HF_DATASETS_CACHE": str(tmp_path / "hf")}
    result = run("lmexp.prepare", *args, cwd=tmp_path, cache=tmp_path / "cache", env=hf_cache)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "prepared 1 source(s)" in result.stdout and "hf: train" in result.stdout
