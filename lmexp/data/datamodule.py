"""The language-model data module: corpus -> splits -> tokenizer -> packed token files -> loaders.

Every expensive step is cached under ``cache_dir`` by a hash of what it depends on, built once under a
file lock and renamed into place, so parallel runs and DDP ranks share the work safely:

    corpora/<hash>/documents.txt   the generated built-in corpus (documents separated by blank lines)
    tokenizers/<hash>/spm.model    the sentencepiece model trained on the training split (unless the run is
                                   given one: the model's own, lmexp/data/tokenizer_store.py)
    tokens/<hash>/<split>.bin      each split as one flat token stream (+ .json with counts)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch import LightningDataModule

from lmexp.cache import atomic_write_json, atomic_write_text, build_lock, files_digest, stable_hash
from lmexp.config.schema import at_least, listed, positive
from lmexp.data.context import DataConfig, DataContext
from lmexp.data.corpus import GrammarConfig, build_grammar, generate_documents
from lmexp.data.packing import TokenBlocks, load_token_file, split_documents, write_token_file
from lmexp.data.pairs import PairSpecials, build_pair_examples, split_sentences
from lmexp.data.sampling import ShardedLoaders
from lmexp.data.text import read_documents, resolve_paths
from lmexp.data.tokenizer import Tokenizer, TokenizerConfig, train_or_load_tokenizer
from lmexp.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class TextDataConfig(DataConfig):
    """``conf/data/builtin.yaml`` and ``text.yaml``: a corpus of documents packed into token blocks."""

    example_formats: ClassVar[tuple[str, ...]] = ("blocks", "pairs")

    source: Literal["builtin", "text"] = "builtin"
    """``builtin`` (the generated grammar corpus, lmexp/data/corpus.py) or ``text`` (your files, ``path``)."""
    block_size: int = positive(128)
    """Tokens per training example."""
    batch_size: int = positive(32)
    """Examples per batch on each device."""
    num_workers: int = at_least(0, 0)
    """DataLoader worker processes."""
    splits: dict[str, float] = listed(lambda: {"train": 0.9, "val": 0.05, "test": 0.05})
    """Fractions of the documents for train/val/test when the split files are not given."""
    split_seed: int = 0
    """Seed of the document split."""
    n_documents: int = at_least(20_000, 3)
    """Documents of the built-in corpus."""
    corpus_seed: int = 0
    """Seed of the built-in corpus."""
    grammar: dict[str, Any] = listed(dict)
    """Overrides of the built-in corpus's GrammarConfig (lmexp/data/corpus.py), e.g. ``{n_topics: 4}``."""
    path: str | list[str] | None = None
    """A file, a directory or a glob (or a list of them) of .txt/.jsonl files (``source: text``)."""
    val_path: str | list[str] | None = None
    """Validation files; with them ``path`` is all training data."""
    test_path: str | list[str] | None = None
    """Test files (optional)."""
    text_field: str = "text"
    """The field of a .jsonl object that holds the document."""

    def problems(self) -> list[str]:
        problems = []
        if self.source == "builtin":
            try:
                GrammarConfig(**self.grammar)
            except ConfigError as error:
                problems.extend(error.problems)
            except TypeError:
                known = ", ".join(GrammarConfig.__dataclass_fields__)
                problems.append(f"data.grammar has an unknown key (known: {known})")
        if self.source == "text" and not self.path:
            problems.append("data.path is not set: expected a file, directory or glob of .txt/.jsonl")
        unknown = sorted(k for k in self.splits if k not in SPLIT_NAMES)
        if unknown:
            problems.append(f"data.splits has unknown split(s) {unknown}: expected train, val, test")
        return problems

    def build(self, context: DataContext) -> LanguageModelData:
        """The data module of this config (it touches no file until ``prepare()``)."""
        return LanguageModelData(
            self, context.tokenizer, context.cache_dir, context.seed, context.example_format, context.nsp,
            given_tokenizer=context.given_tokenizer,
        )  # fmt: skip


class LanguageModelData(ShardedLoaders, LightningDataModule):
    """Packed fixed-length token blocks for causal language modelling, or sentence pairs for masked LM.

    Args:
        config: the ``data`` settings.
        tokenizer: the sentencepiece settings.
        cache_dir: where corpora, tokenizers and token files are cached.
        seed: seed of the training order.
        example_format: ``blocks`` (packed token blocks, causal LM) or ``pairs`` ([CLS] A [SEP] B [SEP]
            sentence pairs, masked LM); set from the task.
        nsp: with ``pairs``, make next-sentence-prediction pairs (half with a random B).
        given_tokenizer: returns the tokenizer the run is given (the model's own, a pre-trained run's), or
            None: train (or load the cached) sentencepiece tokenizer.
    """

    def __init__(
        self,
        config: TextDataConfig,
        tokenizer: TokenizerConfig,
        cache_dir: str | Path = "~/.cache/lmexp",
        seed: int = 0,
        example_format: str = "blocks",
        nsp: bool = False,
        given_tokenizer: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        if example_format not in ("blocks", "pairs"):
            raise ConfigError(f"example format {example_format!r} is not one of blocks, pairs")
        self.config = config
        self.example_format = example_format
        self.nsp = nsp
        self._documents: dict[str, list[str]] = {}
        self.source = config.source
        self.block_size = config.block_size
        self.batch_size = config.batch_size
        self.num_workers = config.num_workers
        self.splits = dict(config.splits)
        self.split_seed = config.split_seed
        self.n_documents = config.n_documents
        self.corpus_seed = config.corpus_seed
        self.grammar_overrides = dict(config.grammar)
        self.path, self.val_path, self.test_path = config.path, config.val_path, config.test_path
        self.text_field = config.text_field
        self.tokenizer_config = replace(tokenizer)
        self.cache_dir = Path(cache_dir).expanduser()
        self.seed = seed
        self.given_tokenizer = given_tokenizer
        self.tokenizer: Tokenizer | None = None
        self.token_files: dict[str, Path] = {}
        self.bpw_floor: float | None = None
        self.labels: list[str] | None = None  # language-model data has no label set
        self.datasets: dict[str, TokenBlocks] = {}

    def grammar_config(self) -> GrammarConfig:
        return GrammarConfig(**self.grammar_overrides)

    # ---------------------------------------------------------------------------------- prepare
    def prepare(self) -> None:
        """Build or load the corpus, tokenizer and token files (idempotent, safe across processes)."""
        if self.tokenizer is not None:
            return
        documents, corpus_key = self.documents_by_split()
        self._documents = documents
        given = self.given_tokenizer() if self.given_tokenizer is not None else None
        if given is None:
            given = train_or_load_tokenizer(
                documents["train"], corpus_key, self.tokenizer_config, self.cache_dir
            )
        self.tokenizer = given
        if self.example_format == "pairs":
            return  # sentence pairs are built from the documents in setup()
        token_key = stable_hash({"corpus": corpus_key, "tokenizer": files_digest([self.tokenizer.path])})
        token_dir = self.cache_dir / "tokens" / token_key
        for split, docs in documents.items():
            target = token_dir / f"{split}.bin"
            with build_lock(token_dir):
                if not target.exists() or not target.with_suffix(".json").exists():
                    write_token_file(docs, self.tokenizer, target)
                    log.info("built token file %s", target)
            self.token_files[split] = target

    def prepare_data(self) -> None:
        self.prepare()

    def documents_by_split(self) -> tuple[dict[str, list[str]], str]:
        if self.source == "builtin":
            documents, corpus_key = self._builtin_documents()
            return self._split(documents, corpus_key), corpus_key
        train_paths = resolve_paths(self.path, "data.path")
        corpus_paths = list(train_paths)
        documents = read_documents(train_paths, "data.path", self.text_field)
        if self.val_path is None and self.test_path is None:
            corpus_key = files_digest(corpus_paths)
            return self._split(documents, corpus_key), corpus_key
        by_split = {"train": documents}
        for split, spec in (("val", self.val_path), ("test", self.test_path)):
            if spec is not None:
                paths = resolve_paths(spec, f"data.{split}_path")
                corpus_paths += paths
                by_split[split] = read_documents(paths, f"data.{split}_path", self.text_field)
        if "val" not in by_split:
            raise ConfigError("data.val_path is not set: with data.test_path, give a validation file too")
        return by_split, files_digest(corpus_paths) + ":explicit"

    def _split(self, documents: list[str], corpus_key: str) -> dict[str, list[str]]:
        fractions = {k: v for k, v in self.splits.items() if v > 0}
        indices = split_documents(len(documents), fractions, self.split_seed)
        return {split: [documents[i] for i in idx] for split, idx in indices.items()}

    def _builtin_documents(self) -> tuple[list[str], str]:
        grammar_config = self.grammar_config()
        key = stable_hash(
            {"grammar": asdict(grammar_config), "n": self.n_documents, "seed": self.corpus_seed}
        )
        corpus_dir = self.cache_dir / "corpora" / key
        text_file, meta_file = corpus_dir / "documents.txt", corpus_dir / "meta.json"
        grammar = build_grammar(grammar_config)
        self.bpw_floor = grammar.entropy_bits_per_word()
        with build_lock(corpus_dir):
            if not meta_file.exists():
                documents = generate_documents(grammar, self.n_documents, self.corpus_seed)
                atomic_write_text(text_file, "\n\n".join(documents) + "\n")
                atomic_write_json(meta_file, {"n_documents": len(documents), "bpw_floor": self.bpw_floor})
                log.info("built corpus %s", text_file)
                return documents, key
        documents = text_file.read_text(encoding="utf-8").strip("\n").split("\n\n")
        if len(documents) != self.n_documents:
            raise DataError(f"cached corpus {text_file} is damaged; delete {corpus_dir} and run again")
        return documents, key

    # ------------------------------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        self.prepare()
        if self.datasets:
            return
        if self.example_format == "pairs":
            self._setup_pairs()
            return
        mask = self.tokenizer.word_start_mask()
        for split, path in self.token_files.items():
            stream, _ = load_token_file(path)
            try:
                self.datasets[split] = TokenBlocks(stream, self.block_size, self.tokenizer.pad_id, mask)
            except DataError as error:
                raise DataError(f"{split} split: {error}") from None

    def _setup_pairs(self) -> None:
        tokenizer = self.tokenizer
        specials = PairSpecials(
            cls_id=tokenizer.special_id("[CLS]"),
            sep_id=tokenizer.special_id("[SEP]"),
            pad_id=tokenizer.pad_id,
        )
        for split, documents in self._documents.items():
            sentences = [split_sentences(document) for document in documents]
            flat = tokenizer.encode([sentence for doc in sentences for sentence in doc])
            ids, start = [], 0
            for doc in sentences:
                ids.append(flat[start : start + len(doc)])
                start += len(doc)
            try:
                self.datasets[split] = build_pair_examples(
                    ids, self.block_size, specials, self.nsp, self.seed
                )
            except DataError as error:
                raise DataError(f"{split} split: {error}") from None

    def _loader_options(self) -> dict[str, Any]:
        pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        workers = self.num_workers
        return {
            "num_workers": workers,
            "pin_memory": pin,
            "persistent_workers": workers > 0,
            # Each loader iterator draws a seed; from its own generator, not torch's global one, so
            # dropout's random stream depends only on the training steps (and resumes exactly).
            "generator": torch.Generator().manual_seed(self.seed),
        }

    def _too_few_for_a_batch(self, n_examples: int) -> str:
        return (
            f"train split has {n_examples} blocks of data.block_size={self.block_size}, fewer than "
            f"one batch of data.batch_size={self.batch_size}"
        )

    @property
    def has_test(self) -> bool:
        return "test" in self._documents
