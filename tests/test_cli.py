"""Bad input through the CLI: one line naming the culprit, non-zero exit, no traceback, no debris.

The cases run forked from a warm interpreter (tests/zygote.py);
test_a_forked_case_reports_exactly_as_a_real_process checks that a real ``python -m`` prints the same."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lmexp.cli import fold_hydra_report, quote_non_ascii

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _small_corpus(path: Path, n_docs: int, words_per_doc: int = 30) -> Path:
    docs = [" ".join(WORDS[(d + i) % len(WORDS)] for i in range(words_per_doc)) for d in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def _files(tmp: Path) -> dict[str, Path]:
    files = {"missing": tmp / "missing.txt", "empty": tmp / "empty.txt", "binary": tmp / "binary.txt"}
    files["empty"].write_text("")
    files["binary"].write_bytes(b"\x00\x01\x02binary\x00" * 100)
    files["latin1"] = tmp / "latin1.txt"
    files["latin1"].write_bytes("caf\u00e9 na\u00efve\n\nmore text here\n".encode("latin-1"))
    files["short"] = _small_corpus(tmp / "short.txt", n_docs=40, words_per_doc=5)
    files["tiny_vocab"] = _small_corpus(tmp / "tiny_vocab.txt", n_docs=200)
    files["one_doc"] = _small_corpus(tmp / "one_doc.txt", n_docs=1, words_per_doc=3000)
    files["bad_jsonl"] = tmp / "bad.jsonl"
    files["bad_jsonl"].write_text('{"text": "a fine document"}\n{"text": "cut short\n', encoding="utf-8")
    _bad_data_files(tmp, files)
    files["corrupt_ckpt"] = tmp / "corrupt.ckpt"
    files["corrupt_ckpt"].write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    return files


def _bad_data_files(tmp: Path, files: dict[str, Path]) -> None:
    """Damaged corpora in the formats of the data engine (lmexp/data/sources.py)."""
    import gzip
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    data = gzip.compress("\n\n".join(f"document {i} with a few words" for i in range(2000)).encode())
    files["cut_gz"] = tmp / "cut.txt.gz"
    files["cut_gz"].write_bytes(data[: len(data) // 2])  # the gzip stream ends early
    files["good_parquet"] = tmp / "good.parquet"
    pq.write_table(pa.table({"text": [f"doc {i} words here" for i in range(500)]}), files["good_parquet"])
    raw = files["good_parquet"].read_bytes()
    files["corrupt_parquet"] = tmp / "corrupt.parquet"
    files["corrupt_parquet"].write_bytes(raw[:100] + b"\0" * 200 + raw[300:])  # a damaged column chunk
    files["no_text_parquet"] = tmp / "body.parquet"
    pq.write_table(pa.table({"body": ["a b c"] * 50}), files["no_text_parquet"])
    files["blank_jsonl"] = tmp / "blank.jsonl"
    files["blank_jsonl"].write_text("\n".join(json.dumps({"text": "  "}) for _ in range(5)) + "\n")


CASES = {
    # name: (overrides, text that the one line must contain)
    "missing file": (["data=text", "data.path={missing}"], "missing.txt"),
    "empty file": (["data=text", "data.path={empty}"], "empty.txt"),
    "binary file": (["data=text", "data.path={binary}"], "binary"),
    "non-utf8 file": (["data=text", "data.path={latin1}"], "UTF-8"),
    "shorter than a block": (
        ["data=text", "data.path={short}", "data.block_size=256", "tokenizer.vocab_size=300"],
        "block_size",
    ),
    "vocab too large": (["data=text", "data.path={tiny_vocab}", "tokenizer.vocab_size=60000"], "vocab_size"),
    "unknown model": (["model=gpt9"], "model/gpt9"),
    "unknown key": (["model.n_layers=3"], "n_layers"),
    "wrong type": (["model.n_layer=four"], "model.n_layer"),
    "heads do not divide width": (["model.n_embd=100", "model.n_head=3"], "model.n_head"),
    "negative lr": (["optim.lr=-0.1"], "optim.lr"),
    "unknown precision": (["trainer.precision=fp8"], "trainer.precision"),
    "model does not support task": (["model=lstm", "task=mlm"], "task=mlm is not supported by model=lstm"),
    "mask rate outside (0, 1)": (["model=bert", "task.mask_rate=1.5"], "task.mask_rate"),
    "sequence shorter than 8": (["model=bert", "data.block_size=4"], "data.block_size"),
    "one document for NSP": (
        [
            "model=bert",
            "data=text",
            "data.path={one_doc}",
            "data.val_path={one_doc}",
            "tokenizer.vocab_size=300",
        ],
        "NSP",
    ),
    "malformed jsonl": (["data=text", "data.path={bad_jsonl}"], "bad.jsonl line 2"),
    "truncated gz": (["data=text", "data.path={cut_gz}"], "cut.txt.gz: is truncated"),
    "corrupt parquet": (
        ["data=text", "data.path={corrupt_parquet}"],
        "corrupt.parquet row group 0 is damaged",
    ),
    "parquet without the text column": (["data=text", "data.path={no_text_parquet}"], "has no column 'text'"),
    "mixture weight 0": (
        ["data=mixture", "data.sources.text.path={good_parquet}", "data.sources.text.weight=0"],
        "data.sources.text.weight=0",
    ),
    "source without documents": (["data=text", "data.path={blank_jsonl}"], "contains no documents"),
    "missing datasets path": (["data=hf", "data.hf.path={missing}"], "data.hf.path: "),
    "unknown config option": (["scheduler=linear"], "scheduler/linear"),
    "lr not a number": (["optim.lr=fast"], "optim.lr"),
    "unknown resume mode": (["resume=sometimes"], "resume="),
    "block size above the model's positions": (
        ["model.max_seq_len=64", "data.block_size=128"],
        "data.block_size=128 exceeds model.max_seq_len=64",
    ),
    "missing checkpoint": (["ckpt_path={missing}"], "ckpt_path"),
    "corrupt checkpoint": (["ckpt_path={corrupt_ckpt}"], "ckpt_path"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(case, cli, tmp_path, cache_dir):
    overrides, culprit = CASES[case]
    files = _files(tmp_path)
    args = [o.format(**files) for o in overrides]
    result = cli("lmexp.train", "debug=fast", "logger=csv", *args, timeout=120, forked=True)

    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and culprit in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    leftovers = [p for p in [*tmp_path.rglob("*"), *cache_dir.rglob("*")] if ".tmp" in p.name]
    assert not leftovers
    assert not list(tmp_path.rglob("metrics.json"))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["wrong type", "corrupt parquet", "missing checkpoint"])
def test_a_forked_case_reports_exactly_as_a_real_process(case, cli, tmp_path):
    """The bad-input cases run forked from a warm interpreter (tests/zygote.py); a real ``python -m``
    prints the same bytes and exits with the same status."""
    files = _files(tmp_path)
    args = ["lmexp.train", "debug=fast", "logger=csv", *(o.format(**files) for o in CASES[case][0])]
    caches = [{"LMEXP_CACHE_DIR": str(tmp_path / name)} for name in ("real", "forked")]  # both start cold
    real, forked = cli(*args, env=caches[0], timeout=120), cli(*args, env=caches[1], timeout=120, forked=True)

    def printed(result):  # without the log lines' timestamps
        return result.returncode, re.sub(r"(?m)^\[[\d\-: ,]+\]", "", result.stdout), result.stderr

    assert printed(forked) == printed(real)


@pytest.mark.slow
def test_full_error_shows_traceback(cli):
    result = cli("lmexp.train", "debug=fast", "optim.lr=-1", env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "optim.lr" in result.stderr


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A real checkpoint of a tiny run (debug=fast settings)."""
    from lmexp.train import train
    from tests.conftest import make_config

    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    train(make_config(run_dir, cache_dir, "trainer.max_steps=2", "logger=csv"))
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "culprit"),
    [
        (["tokenizer=unigram"], "different tokenizer"),
        (["model.n_layer=2"], "different model (model.n_layer: 1 there, 2 now)"),
    ],
    ids=["tokenizer", "model"],
)
def test_checkpoint_that_does_not_fit_the_run(cli, tmp_path, checkpoint, overrides, culprit):
    result = cli(
        "lmexp.train", "debug=fast", "logger=csv", f"ckpt_path={checkpoint}", *overrides, forked=True
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"error: ckpt_path={checkpoint}") and culprit in lines[0]
    assert not list(tmp_path.rglob("metrics.json")) and not list(tmp_path.rglob("*.ckpt"))


def test_non_ascii_values_are_quoted_for_hydra() -> None:
    argv = ["prompt=大语言模型", "data.path=语料/*.txt", "model=gpt", "+tag=naïve", 'x="已引"', "a=[中,文]"]
    assert quote_non_ascii(argv) == [
        'prompt="大语言模型"',
        'data.path="语料/*.txt"',
        "model=gpt",
        '+tag="naïve"',
        'x="已引"',
        "a=[中,文]",
    ]


def test_hydra_lexer_errors_fold_into_a_quoting_hint() -> None:
    report = (
        "LexerNoViableAltException: a=[中,文]\n    ^\nSee https://hydra.cc/docs/advanced/override_grammar"
    )
    line = fold_hydra_report(report)
    assert line.startswith("cannot read the override 'a=[中,文]'") and "quote it" in line and "\n" not in line


def test_a_storage_failure_anywhere_is_one_line_naming_the_file(capsys):
    import errno

    from lmexp.cli import exit_on_error

    with pytest.raises(SystemExit) as stop, exit_on_error():
        raise PermissionError(errno.EACCES, "Permission denied", "/data/corpus.txt")
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        "error: cannot access /data/corpus.txt: permission denied (EACCES); make the directory writable or "
        "write elsewhere\n"
    )
    with pytest.raises(FileNotFoundError), exit_on_error():  # not a storage failure: left to its handler
        raise FileNotFoundError(errno.ENOENT, "No such file", "/nowhere")
