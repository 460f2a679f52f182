"""Tests for sentencepiece training, caching and the Tokenizer wrapper (lmexp.data.tokenizer)."""

from __future__ import annotations

import multiprocessing
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

import lmexp.data.tokenizer as tokenizer_module
from lmexp.data.tokenizer import Tokenizer, TokenizerConfig, tokenizer_cache_dir, train_or_load_tokenizer
from lmexp.errors import ConfigError, DataError

WORDS = (
    "the a one some every small large red green quick slow old young cat dog bird horse river mountain "
    "city garden runs jumps sleeps sings walks eats reads writes over under near behind with without "
    "today yesterday quietly loudly happily because although while and but"
).split()
SPECIALS = ["[CLS]", "[SEP]", "[MASK]"]


def make_documents(n_documents: int, seed: int = 0) -> list[str]:
    """Random English-like documents of a few sentences, some spanning several lines."""
    rng = random.Random(seed)

    def sentence() -> str:
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        return " ".join(words).capitalize() + rng.choice([".", ".", "!", "?", ","])

    return ["\n".join(" ".join(sentence() for _ in range(3)) for _ in range(2)) for _ in range(n_documents)]


DOCUMENTS = make_documents(300)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def bpe(cache_dir: Path) -> Tokenizer:
    config = TokenizerConfig(kind="bpe", vocab_size=400, extra_special_tokens=SPECIALS)
    return train_or_load_tokenizer(DOCUMENTS, "corpus-a", config, cache_dir)


@pytest.fixture(scope="module")
def unigram(cache_dir: Path) -> Tokenizer:
    config = TokenizerConfig(kind="unigram", vocab_size=360, extra_special_tokens=SPECIALS)
    return train_or_load_tokenizer(DOCUMENTS, "corpus-a", config, cache_dir)


@pytest.fixture(params=["bpe", "unigram"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(request.param)


def test_fixed_special_ids(tok: Tokenizer) -> None:
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert tok.vocab_size in (400, 360)
    assert tok.path.name == "spm.model"


def test_round_trip(tok: Tokenizer) -> None:
    texts = make_documents(5, seed=99)
    texts = [" ".join(t.split()) for t in texts]  # sentencepiece folds newlines and runs of spaces into one
    encoded = tok.encode(texts)
    assert len(encoded) == len(texts)
    assert all(isinstance(i, int) for i in encoded[0])
    assert [tok.decode(ids) for ids in encoded] == texts


def test_extra_special_tokens_are_single_ids(tok: Tokenizer) -> None:
    ids = {piece: tok.special_id(piece) for piece in SPECIALS}
    assert len(set(ids.values())) == 3 and min(ids.values()) > 3
    (encoded,) = tok.encode(["[CLS] the cat [MASK] over[SEP]dog"])
    for piece, token_id in ids.items():
        assert encoded.count(token_id) == 1, piece
    assert tok.decode(encoded) == "[CLS] the cat [MASK] over[SEP]dog"


def test_special_id_unknown_piece(bpe: Tokenizer) -> None:
    with pytest.raises(ConfigError, match=r"'\[NOPE\]' is not in the vocabulary"):
        bpe.special_id("[NOPE]")


def test_byte_fallback_round_trips_unseen_characters(tok: Tokenizer) -> None:
    text = "the Ω cat 日本 eats"
    (encoded,) = tok.encode([text])
    assert tok.unk_id not in encoded
    assert tok.decode(encoded) == text


def test_cache_is_reused_without_training(
    bpe: Tokenizer, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("training should not run for a cached tokenizer")

    monkeypatch.setattr(tokenizer_module, "_train", no_training)
    mtime = bpe.path.stat().st_mtime_ns
    config = TokenizerConfig(kind="bpe", vocab_size=400, extra_special_tokens=SPECIALS, num_threads=1)
    again = train_or_load_tokenizer(DOCUMENTS, "corpus-a", config, cache_dir)
    assert again.path == bpe.path and again.path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in bpe.path.parent.iterdir()) == ["meta.json", "spm.model", "spm.vocab"]
    assert again.encode(["the cat"]) == bpe.encode(["the cat"])


def test_cache_key_depends_on_corpus_and_config(tmp_path: Path) -> None:
    base = TokenizerConfig()
    assert tokenizer_cache_dir("a", base, tmp_path) != tokenizer_cache_dir("b", base, tmp_path)
    other = TokenizerConfig(vocab_size=5000)
    assert tokenizer_cache_dir("a", base, tmp_path) != tokenizer_cache_dir("a", other, tmp_path)
    assert tokenizer_cache_dir("a", base, tmp_path).parent == tmp_path / "tokenizers"


def test_vocab_too_large_for_corpus(tmp_path: Path) -> None:
    config = TokenizerConfig(vocab_size=8000)
    with pytest.raises(ConfigError) as info:
        train_or_load_tokenizer(make_documents(20), "tiny", config, tmp_path)
    message = str(info.value)
    assert message.startswith("tokenizer.vocab_size=8000 is larger than this corpus supports (at most ")
    assert message.endswith("); lower tokenizer.vocab_size") and "\n" not in message
    directory = tokenizer_cache_dir("tiny", config, tmp_path)
    assert list(directory.iterdir()) == []  # nothing half-written survives the failure


def test_vocab_too_small_for_characters(tmp_path: Path) -> None:
    config = TokenizerConfig(vocab_size=64, byte_fallback=False)
    docs = ["".join(chr(0x4E00 + i) for i in range(100))]  # 100 distinct characters
    with pytest.raises(ConfigError, match=r"tokenizer.vocab_size=64 is smaller than the \d+ pieces"):
        train_or_load_tokenizer(docs, "chars", config, tmp_path)


def test_empty_corpus(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no non-empty lines"):
        train_or_load_tokenizer(["", "  \n "], "empty", TokenizerConfig(), tmp_path)


def test_training_is_silent(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    config = TokenizerConfig(vocab_size=350)
    train_or_load_tokenizer(make_documents(30), "quiet", config, tmp_path)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_config_collects_all_problems() -> None:
    with pytest.raises(ConfigError) as info:
        TokenizerConfig(kind="wordpiece", vocab_size=10, character_coverage=2.0, extra_special_tokens=["a b"])
    message = str(info.value)
    for key in ("tokenizer.kind", "tokenizer.vocab_size", "tokenizer.character_coverage"):
        assert key in message
    assert "tokenizer.extra_special_tokens" in message and "\n" not in message


def test_config_vocab_too_small_for_byte_fallback() -> None:
    with pytest.raises(ConfigError, match="too small for tokenizer.byte_fallback"):
        TokenizerConfig(vocab_size=200)
    TokenizerConfig(vocab_size=200, byte_fallback=False)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.model")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(DataError, match="is not a sentencepiece model") as info:
        Tokenizer.load(garbage)
    assert "\n" not in str(info.value)


def _train_in_subprocess(cache_dir: str) -> str:
    config = TokenizerConfig(vocab_size=350)
    tokenizer = train_or_load_tokenizer(make_documents(50, seed=3), "concurrent", config, Path(cache_dir))
    return str(tokenizer.path)


@pytest.mark.slow
def test_concurrent_builders_share_one_model(tmp_path: Path) -> None:
    # spawn, not fork: a forked child of a process that may hold torch's threads can deadlock
    with ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("spawn")) as pool:
        paths = list(pool.map(_train_in_subprocess, [str(tmp_path)] * 3))
    assert len(set(paths)) == 1
    directory = Path(paths[0]).parent
    assert sorted(p.name for p in directory.iterdir()) == ["meta.json", "spm.model", "spm.vocab"]
    assert Tokenizer.load(Path(paths[0])).vocab_size == 350


def test_load_tokenizer_by_kind_and_the_files_that_key_caches(bpe: Tokenizer, tmp_path: Path) -> None:
    from lmexp.data.tokenizer import load_tokenizer, tokenizer_files

    loaded = load_tokenizer(bpe.path)
    assert isinstance(loaded, Tokenizer) and loaded.encode(["a cat"]) == bpe.encode(["a cat"])
    assert tokenizer_files(bpe.path) == [bpe.path]
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / ".lock").write_text("")
    assert [p.name for p in tokenizer_files(tmp_path)] == ["tokenizer.json", "tokenizer_config.json"]
    with pytest.raises(DataError, match="is a directory without tokenizer.json"):
        load_tokenizer(tmp_path / "..")


def test_load_tokenizer_of_a_hugging_face_directory(tmp_path: Path) -> None:
    from lmexp.data.text_tokenizer import HFTokenizer
    from lmexp.data.tokenizer import load_tokenizer

    if not hasattr(HFTokenizer, "load"):  # HFTokenizer.load comes with the branch of Hugging Face backbones
        pytest.skip("HFTokenizer.load is not in this branch")
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rust = RustTokenizer(models.BPE(unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    rust.train_from_iterator(
        DOCUMENTS[:50], trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<eos>"])
    )
    PreTrainedTokenizerFast(tokenizer_object=rust, eos_token="<eos>", unk_token="<unk>").save_pretrained(
        tmp_path
    )
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, HFTokenizer) and loaded.encode(["a cat"])[0]


def test_default_coverage_spells_rare_characters_in_bytes(tmp_path: Path) -> None:
    # 60 characters that occur once each in a corpus of common words: with character_coverage 1.0 every
    # one of them needs a piece (367 pieces in all); the default leaves them to byte pieces (309).
    rare = [chr(0x4E00 + i) for i in range(60)]
    docs = make_documents(400) + ["".join(rare)]
    tok = train_or_load_tokenizer(docs, "rare", TokenizerConfig(vocab_size=340), tmp_path)
    assert tok.decode(tok.encode([rare[7] + " cat"])[0]) == rare[7] + " cat"
