"""Damaged and interrupted caches: detected on open, rebuilt under the lock with a warning, never read whole.

Covers the tokenizer model (lmexp/data/tokenizer.py), the generated corpus (lmexp/data/datamodule.py) and the
token shards of the preparation engine (through its public API, lmexp.data.prepare; the engine's own tests
cover its verification in detail). The interrupted builds kill a real process (SIGKILL or SIGTERM) at a
known moment: the child's build step is wrapped to report and then wait to be killed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lmexp.data.tokenizer import (
    META_FILE,
    MODEL_FILE,
    Tokenizer,
    TokenizerConfig,
    cached_model_problem,
    tokenizer_cache_dir,
    train_or_load_tokenizer,
)
from lmexp.errors import DataError
from tests.conftest import REPO
from tests.data.engine_helpers import make_documents

DOCUMENTS = make_documents(300)  # the children below build the same (they import no test module: fast)
CONFIG = TokenizerConfig(vocab_size=300)
KEY = "damage-tests"


def _built(cache: Path) -> Path:
    tokenizer = train_or_load_tokenizer(DOCUMENTS, KEY, CONFIG, cache)
    return Path(tokenizer.path)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda data: data[: len(data) // 2], r"spm\.model is \d+ bytes, expected \d+ \(truncated"),
        (
            lambda data: data[:100] + bytes([data[100] ^ 1]) + data[101:],
            r"does not match its recorded SHA-256",
        ),
    ],
    ids=["truncated", "altered"],
)
def test_a_damaged_tokenizer_model_is_rebuilt_with_a_warning(tmp_path, caplog, damage, expected):
    model = _built(tmp_path)
    whole, ids = model.read_bytes(), Tokenizer.load(model).encode(DOCUMENTS[:5])
    model.write_bytes(damage(whole))
    with pytest.raises(DataError, match=expected) as info:  # never loaded as if whole
        Tokenizer.load(model)
    assert "\n" not in str(info.value)
    caplog.set_level(logging.WARNING)
    assert _built(tmp_path) == model
    assert cached_model_problem(model) is None and Tokenizer.load(model).encode(DOCUMENTS[:5]) == ids
    (warning,) = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert warning.startswith(f"tokenizer cache {model} is damaged (") and warning.endswith("rebuilding it")


def test_a_tokenizer_model_whose_metadata_is_lost_is_rebuilt(tmp_path, caplog):
    model = _built(tmp_path)
    (model.parent / META_FILE).unlink()
    caplog.set_level(logging.WARNING)
    _built(tmp_path)
    assert "meta.json is missing" in caplog.text
    assert "model" in json.loads((model.parent / META_FILE).read_text())


def test_a_damaged_model_with_no_documents_to_rebuild_from_is_removed_and_named(tmp_path):
    model = _built(tmp_path)
    model.write_bytes(model.read_bytes()[:10])
    with pytest.raises(DataError, match=f"the cached model {model} was damaged .* removed; run again"):
        train_or_load_tokenizer([], KEY, CONFIG, tmp_path)
    assert not model.exists()


def test_a_damaged_corpus_cache_is_generated_again_with_a_warning(tmp_path, caplog, cache_dir):
    from lmexp.config.settings import load_settings
    from lmexp.training.build import build_datamodule
    from tests.conftest import make_config

    settings = load_settings(make_config(tmp_path / "run", tmp_path / "cache"))
    build_datamodule(settings, tmp_path / "cache").prepare_data()
    (documents,) = (tmp_path / "cache").glob("corpora/*/documents.txt")
    whole = documents.read_bytes()
    documents.write_bytes(whole[: len(whole) - 50])  # truncated
    caplog.set_level(logging.WARNING)
    build_datamodule(settings, tmp_path / "cache").prepare_data()
    assert f"corpus cache {documents} is damaged (documents.txt is" in caplog.text
    assert documents.read_bytes() == whole


def test_a_truncated_token_shard_is_rebuilt_with_a_warning_through_the_engine(tmp_path, caplog):
    from lmexp.data.prepare import PrepareConfig, prepare_source
    from lmexp.data.sources import SourceSpec
    from tests.data.engine_helpers import write_txt

    tokenizer = _built(tmp_path / "tok")
    spec = SourceSpec("web", str(write_txt(tmp_path / "corpus.txt", DOCUMENTS)))
    config = PrepareConfig(splits={"train": 0.8, "val": 0.1, "test": 0.1}, unit_bytes=4000, workers=1)
    prepared = prepare_source(spec, tokenizer, tmp_path / "cache", config)
    expected = prepared.stream("train")[:]
    shard = prepared.directory / "u00001.train.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    caplog.set_level(logging.WARNING)
    rebuilt = prepare_source(spec, tokenizer, tmp_path / "cache", config)
    assert "unit 1 is damaged (" in caplog.text and "rebuilding it" in caplog.text
    assert np.array_equal(rebuilt.stream("train")[:], expected)


# ------------------------------------------------------------------------------ interrupted builds
BLOCKING_TOKENIZER_BUILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import lmexp.data.tokenizer as tokenizer
    from tests.data.engine_helpers import make_documents

    DOCUMENTS, KEY, CONFIG = make_documents(300), sys.argv[2], tokenizer.TokenizerConfig(vocab_size=300)

    real_train = tokenizer._train
    def train_then_wait(*args, **kwargs):
        n_lines = real_train(*args, **kwargs)  # the model is written, in the temporary build dir only
        print("building", flush=True)
        time.sleep(120)
        return n_lines
    tokenizer._train = train_then_wait
    tokenizer.train_or_load_tokenizer(DOCUMENTS, KEY, CONFIG, Path(sys.argv[1]))
    """
)


def _interrupt(script: str, signum: int, *args: str) -> None:
    """Run ``script`` until it says it is building, then send ``signum``."""
    child = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "building"
        child.send_signal(signum)
        assert child.wait(timeout=60) == -signum
    finally:
        child.kill()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_tokenizer_build_interrupted_then_rerun_builds_it_again(tmp_path, signum):
    _interrupt(BLOCKING_TOKENIZER_BUILD, signum, str(tmp_path), KEY)
    directory = tokenizer_cache_dir(KEY, CONFIG, tmp_path)
    assert not (directory / MODEL_FILE).exists()  # nothing a reader could take for a finished model
    assert list(directory.glob(".build-*"))  # what the killed builder left
    tokenizer = train_or_load_tokenizer(DOCUMENTS, KEY, CONFIG, tmp_path)
    assert tokenizer.vocab_size == CONFIG.vocab_size
    assert cached_model_problem(directory / MODEL_FILE) is None  # whole, with its recorded checksum
    assert not list(directory.glob(".build-*"))  # cleared by the rebuild, under the lock
