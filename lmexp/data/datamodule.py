"""The language-model data module: sources -> tokenizer -> token shards (the data engine) -> loaders.

Every corpus of ``data=builtin|text|hf|mixture`` becomes a list of sources
(:class:`~lmexp.data.sources.SourceSpec`) and goes through the data engine (:mod:`lmexp.data.engine`):
documents are streamed from the files or datasets, a tokenizer is trained on a bounded sample of the
training documents, and worker processes write each split as memory-mapped token shards, so no corpus is
ever held in memory. Splits are decided per document by a seeded hash of its text
(:class:`~lmexp.data.prepare.SplitRule`), or given by files (``val_path``, ``test_path``). Everything is
cached under ``cache_dir`` by what it depends on, built once under file locks:

    corpora/<hash>/documents.txt   the generated built-in corpus (documents separated by blank lines)
    tokenizers/<hash>/spm.model    the sentencepiece model trained on the sample (unless the run is
                                   given one: the model's own, a checkpoint's; data/tokenizer_store.py)
    sources/<hash>/...             the token shards of each source (layout in lmexp/data/prepare.py)

Masked LM (``task=mlm``) reads sentence pairs, which need whole documents as text: it reads the documents
of every split through the same readers and split rule, but at most ``data.pairs_max_bytes`` of them
(evenly spaced units of each source), and holds those in memory.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from lmexp.cache import (
    atomic_path,
    atomic_write_json,
    build_lock,
    fingerprint,
    fingerprint_problem,
    stable_hash,
)
from lmexp.config.schema import Schema, _expected, at_least, listed, parse, positive
from lmexp.data.context import DataConfig, DataContext
from lmexp.data.corpus import GrammarConfig, build_grammar, generate_documents
from lmexp.data.engine import PreparedCorpus, prepare_corpus, process_share
from lmexp.data.pairs import PairSpecials, build_pair_examples, split_sentences
from lmexp.data.prepare import SPLITS, PrepareConfig, SourcePlan, SplitRule, plan_source
from lmexp.data.sampling import EvaluationBatches, ShardedLoaders, spaced_subset
from lmexp.data.sources import SourceSpec, is_hf_source, open_hf_dataset, read_unit
from lmexp.data.tokenizer import TokenizerConfig, load_tokenizer
from lmexp.data.tokenizer_sample import SampleConfig, train_or_load_sampled_tokenizer, units_to_read
from lmexp.data.tokenizer_store import cache_tokenizer_model
from lmexp.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SOURCE_KINDS = ("builtin", "text", "hf", "mixture")
_MISSING = "???"  # OmegaConf's mark of a value the user must give


# ------------------------------------------------------------------------------------- sub-schemas
@dataclass
class HFSourceConfig(Schema):
    """``data.hf`` (``data=hf``): a Hugging Face ``datasets`` source, read locally, never downloaded by
    tests."""

    group: ClassVar[str] = "data.hf"

    path: str = ""
    """A builder with data_files (``json``, ``parquet``...), a dataset or save_to_disk directory, a Hub id."""
    name: str | None = None
    """The dataset's configuration name (``load_dataset``'s ``name``)."""
    split: str = "train"
    """The split to read (of a ``DatasetDict``, or of ``load_dataset``)."""
    data_files: str | list[str] | dict[str, Any] | None = None
    """``load_dataset``'s ``data_files`` (local paths or globs, e.g. with ``path: json``)."""
    revision: str | None = None
    """The Hub revision (a commit, tag or branch); pin it so that the cache key follows the data."""
    streaming: bool = False
    """Stream the records instead of converting the whole dataset to Arrow first."""
    cache_dir: str | None = None
    """Where ``load_dataset`` keeps its Arrow copy; null: the Hugging Face default."""

    def problems(self) -> list[str]:
        # Worded as parse() words a missing ``???`` value, so that the two give one message (deduplicated).
        return [] if self.path else [f"data.hf.path is not set: expected {_expected(HFSourceConfig, 'path')}"]


def _read_checked(text_file: Path, meta_file: Path) -> tuple[bytes, str | None]:
    """The cached corpus file's bytes and what is wrong with them (None: they match the recorded
    fingerprint)."""
    try:
        data, meta = text_file.read_bytes(), json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return b"", f"unreadable: {type(error).__name__}"
    return data, fingerprint_problem(
        text_file.name, data, meta.get("documents") if isinstance(meta, dict) else None
    )


@dataclass
class SourceEntry(Schema):
    """One source of ``data.sources`` (``data=mixture``): where its documents are and its weight."""

    group: ClassVar[str] = "data.source"  # messages are renamed to data.sources.<name> (parse_entry)

    name: str = ""
    """The source's name in metrics (``val/<name>/loss``); the entry's key when ``sources`` is a mapping."""
    path: str | list[str] | None = None
    """Files, directories or globs (.txt, .jsonl, .parquet, .gz/.zst); ``format: hf``: a datasets path."""
    format: Literal["auto", "txt", "jsonl", "parquet", "hf", "builtin"] = "auto"
    """``auto`` (by suffix), a file format, ``hf`` (``datasets``) or ``builtin`` (the generated corpus)."""
    text_field: str = "text"
    """The JSON field or column holding the document text."""
    weight: float = positive(1.0)
    """Relative share of training blocks drawn from this source."""
    hf_name: str | None = None
    """``format: hf``: the dataset's configuration name."""
    split: str = "train"
    """``format: hf``: the split to read."""
    data_files: str | list[str] | dict[str, Any] | None = None
    """``format: hf``: ``load_dataset``'s ``data_files``."""
    revision: str | None = None
    """``format: hf``: the Hub revision."""
    streaming: bool = False
    """``format: hf``: stream the records."""
    cache_dir: str | None = None
    """``format: hf``: where ``load_dataset`` keeps its Arrow copy."""
    assign_split: Literal["train", "val", "test"] | None = None
    """Put all of this source's documents in one split (a held-out set) instead of splitting them."""


def parse_entry(schema: type[Schema], node: Any, key: str) -> Any:
    """``parse`` of a sub-schema whose messages must name ``key`` (e.g. ``data.sources.web``)."""
    try:
        return parse(schema, node, key)
    except ConfigError as error:
        prefix = schema.group + "."
        problems = [key + "." + p[len(prefix) :] if p.startswith(prefix) else p for p in error.problems]
        raise ConfigError(problems) from None


# ------------------------------------------------------------------------------------------- config
@dataclass
class TextDataConfig(DataConfig):
    """``conf/data/builtin.yaml``, ``text.yaml``, ``hf.yaml``, ``mixture.yaml``: a corpus of documents packed
    into token blocks (or read as sentence pairs by masked LM)."""

    example_formats: ClassVar[tuple[str, ...]] = ("blocks", "pairs")

    source: Literal["builtin", "text", "hf", "mixture"] = "builtin"
    """``builtin`` (generated corpus), ``text`` (``path``), ``hf`` (``hf.*``) or ``mixture`` (``sources``)."""
    block_size: int = positive(128)
    """Tokens per training example."""
    batch_size: int = positive(32)
    """Examples per batch on each device."""
    num_workers: int = at_least(0, 0)
    """DataLoader worker processes."""
    splits: dict[str, float] = listed(lambda: {"train": 0.9, "val": 0.05, "test": 0.05})
    """Fractions of the documents for train/val/test (each document by a hash of its text)."""
    split_seed: int = 0
    """Seed of the split hash."""
    eval_tokens: int = at_least(1 << 17, 0)
    """Tokens scored per validation while training (a fixed, evenly spaced subset; 0: all); the final: all."""
    document_mask: bool = False
    """Mask attention at document boundaries inside a block (gpt, llama): batches carry ``document_ids``."""
    n_documents: int = at_least(20_000, 3)
    """Documents of the built-in corpus."""
    corpus_seed: int = 0
    """Seed of the built-in corpus."""
    grammar: dict[str, Any] = listed(dict)
    """Overrides of the built-in corpus's GrammarConfig (lmexp/data/corpus.py), e.g. ``{n_topics: 4}``."""
    path: str | list[str] | None = None
    """``source: text``: files, directories or globs (.txt, .jsonl, .parquet; .gz/.zst compressed)."""
    val_path: str | list[str] | None = None
    """Validation files; with them ``path`` is all training data."""
    test_path: str | list[str] | None = None
    """Test files (optional)."""
    format: Literal["auto", "txt", "jsonl", "parquet"] = "auto"
    """File format of ``path``/``val_path``/``test_path``: ``auto`` goes by the file suffix."""
    text_field: str = "text"
    """The JSON field (.jsonl) or column (Parquet, ``datasets``) holding the document text."""
    hf: dict[str, Any] = listed(dict)
    """``source: hf``: a datasets source (path, name, split, data_files, revision, streaming, cache_dir)."""
    sources: dict[str, dict[str, Any]] | list[dict[str, Any]] = listed(dict)
    """``source: mixture``: the sources by name (or a list with ``name``s), each with a ``weight``."""
    prepare_workers: int = at_least(0, 0)
    """Processes that tokenize the corpus while preparing it; 0: one per CPU core this process may use."""
    unit_bytes: int = at_least(0, 0)
    """Input bytes per unit of preparation work; 0: the source's size / 64, within 4 to 256 MiB."""
    verify: Literal["size", "sample", "full"] = "sample"
    """How token shards are checked when opened: sizes, sizes and a sampled checksum, or every byte."""
    pairs_max_bytes: int = positive(64 << 20)
    """Masked LM: at most this many bytes of documents are read for sentence pairs (held in memory)."""

    def problems(self) -> list[str]:
        problems = []
        if self.source == "builtin" or self._entries_of_format("builtin"):
            problems += grammar_problems(self.grammar)
        if self.source == "text" and not self.path:
            problems.append("data.path is not set: expected a file, directory or glob of documents")
        if self.source == "text" and self.test_path and not self.val_path:
            problems.append("data.val_path is not set: with data.test_path, give a validation file too")
        if self.source == "hf":
            problems += _collected(lambda: parse_entry(HFSourceConfig, self.hf, "data.hf"))
        if self.source == "mixture":
            problems += self._mixture_problems()
        for key, used_by in (("hf", "hf"), ("sources", "mixture")):
            if getattr(self, key) and self.source != used_by:
                problems.append(f"data.{key} is set but data.source={self.source}: use data={used_by}")
        problems += [p for p in self.prepare_config().problems("data") if p.startswith("data.splits")]
        return list(dict.fromkeys(problems))  # a missing ``???`` value is reported by parse() and here

    def _mixture_problems(self) -> list[str]:
        entries = self.source_entries()
        if isinstance(entries, list):
            return entries
        if not entries:
            return ["data.sources is empty: expected at least one source with a path and a weight"]
        problems = []
        for name, entry in entries.items():
            if entry.format != "builtin" and (not entry.path or entry.path == _MISSING):
                problems.append(f"data.sources.{name}.path is not set: expected files, a directory or a glob")
        if all(entry.assign_split not in (None, "train") for entry in entries.values()):
            problems.append("data.sources: no source has training documents (each one has assign_split)")
        return problems

    def _entries_of_format(self, fmt: str) -> list[str]:
        entries = self.source_entries() if self.source == "mixture" else {}
        return [] if isinstance(entries, list) else [n for n, e in entries.items() if e.format == fmt]

    def source_entries(self) -> dict[str, SourceEntry] | list[str]:
        """``data.sources`` parsed, by name; or the list of problems found in it."""
        raw = self.sources
        if isinstance(raw, list):
            named = {}
            for position, node in enumerate(raw):
                name = node.get("name") if isinstance(node, dict) else None
                if not isinstance(name, str) or not name or "/" in name:
                    return [f"data.sources[{position}].name={name!r}: expected a name without '/'"]
                if name in named:
                    return [f"data.sources: two sources are named {name!r}"]
                named[name] = node
            raw = named
        problems, entries = [], {}
        for name, node in raw.items():
            if not isinstance(node, dict):
                problems.append(f"data.sources.{name}={node!r}: expected a mapping (path, weight, ...)")
                continue
            node = {**node, "name": name}
            entry = _collected(
                lambda node=node, name=name: parse_entry(SourceEntry, node, f"data.sources.{name}")
            )
            if isinstance(entry, list):
                problems += entry
            else:
                entries[name] = entry
        return problems or entries

    def prepare_config(self) -> PrepareConfig:
        """The engine's settings of this corpus."""
        return PrepareConfig(
            splits=dict(self.splits),
            split_seed=self.split_seed,
            unit_bytes=self.unit_bytes,
            workers=self.prepare_workers,
            verify=self.verify,
        )

    def build(self, context: DataContext) -> LanguageModelData:
        """The data module of this config (it touches no file until ``prepare()``)."""
        return LanguageModelData(self, context)


def grammar_problems(grammar: dict[str, Any]) -> list[str]:
    """What is wrong with ``data.grammar`` (overrides of the built-in corpus's GrammarConfig)."""
    try:
        GrammarConfig(**grammar)
    except ConfigError as error:
        return error.problems
    except TypeError:
        known = ", ".join(GrammarConfig.__dataclass_fields__)
        return [f"data.grammar has an unknown key (known: {known})"]
    return []


def _collected(build: Any) -> Any:
    """``build()``, or the problems of the ConfigError it raised (a list)."""
    try:
        return build()
    except ConfigError as error:
        return list(error.problems)


# ------------------------------------------------------------------------------------------ batches
class BlockCollate:
    """Batches of token blocks: torch's default collation, plus ``document_ids`` (B, T) when documents are
    masked, and ``source_id`` (a Python int) when every block of the batch comes from one source."""

    def __init__(self, eos_id: int, document_mask: bool) -> None:
        self.eos_id, self.document_mask = eos_id, document_mask

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        batch = default_collate(items)
        if self.document_mask:
            from lmexp.models.document_mask import document_ids_from_eos

            # lmexp's streams are [eos] doc [eos] doc: each eos opens the document that follows it.
            batch["document_ids"] = document_ids_from_eos(batch["input_ids"], self.eos_id)  # (B, T)
        sources = batch["source"]  # (B,)
        if bool((sources == sources[0]).all()):
            batch["source_id"] = int(sources[0])
        return batch


# -------------------------------------------------------------------------------------- data module
class LanguageModelData(ShardedLoaders, LightningDataModule):
    """Packed token blocks of every source for causal language modelling, or sentence pairs for masked LM.

    Args:
        config: the ``data`` settings.
        context: the tokenizer settings (or a ready tokenizer), cache dir, seed and the task's example
            format: ``blocks`` (packed token blocks) or ``pairs`` ([CLS] A [SEP] B [SEP], masked LM).
    """

    def __init__(self, config: TextDataConfig, context: DataContext) -> None:
        super().__init__()
        if context.example_format not in TextDataConfig.example_formats:
            raise ConfigError(f"example format {context.example_format!r} is not one of blocks, pairs")
        self.config = config
        self.example_format = context.example_format
        self.nsp = context.nsp
        self.block_size = config.block_size
        self.batch_size = config.batch_size
        self.num_workers = config.num_workers
        self.tokenizer_config = context.tokenizer
        self.tokenizer_model = context.tokenizer_model
        self.tokenizer_dir = context.tokenizer_dir
        self.cache_dir = Path(context.cache_dir).expanduser()
        self.seed = context.seed
        self.tokenizer: Any = None
        self.corpus: PreparedCorpus | None = None
        self.bpw_floor: float | None = None
        self.labels: list[str] | None = None  # language-model data has no label set
        self.source_names: list[str] = []
        """The mixture's sources, in order (per-source metrics); empty for one source."""
        self.datasets: dict[str, Any] = {}
        self._pair_documents: dict[str, list[str]] = {}

    # ---------------------------------------------------------------------------------- sources
    def source_specs(self) -> list[SourceSpec]:
        """The engine's sources of this corpus (the built-in corpus is generated here, once)."""
        config = self.config
        if config.source == "builtin":
            return [SourceSpec("builtin", str(self._builtin_corpus()), format="txt", key="data")]
        if config.source == "hf":
            hf = parse_entry(HFSourceConfig, config.hf, "data.hf")
            return [
                SourceSpec(
                    "hf", hf.path, "hf", config.text_field, hf.name, hf.split, hf.data_files, hf.revision,
                    hf.streaming, hf.cache_dir, key="data.hf",
                )
            ]  # fmt: skip
        if config.source == "mixture":
            entries = config.source_entries()
            if isinstance(entries, list):
                raise ConfigError(entries)
            return [self._entry_spec(entry) for entry in entries.values()]
        held_out = config.val_path is not None or config.test_path is not None
        specs = [self._file_spec("text", config.path, "train" if held_out else None, "data.path")]
        for split in ("val", "test"):
            if getattr(config, f"{split}_path") is not None:
                specs.append(
                    self._file_spec(split, getattr(config, f"{split}_path"), split, f"data.{split}_path")
                )
        return specs

    def _file_spec(self, name: str, path: Any, split: str | None, path_key: str) -> SourceSpec:
        config = self.config
        return SourceSpec(
            name, path, config.format, config.text_field, assign_split=split, key="data", path_key=path_key
        )

    def _entry_spec(self, entry: SourceEntry) -> SourceSpec:
        if entry.format == "builtin":
            path, fmt = str(self._builtin_corpus()), "txt"
        else:
            path, fmt = entry.path, entry.format
        return SourceSpec(
            entry.name, path, fmt, entry.text_field, entry.hf_name, entry.split, entry.data_files,
            entry.revision, entry.streaming, entry.cache_dir, entry.weight, entry.assign_split,
        )  # fmt: skip

    def _builtin_corpus(self) -> Path:
        """The built-in corpus's documents file, generated once per settings (again, with a warning, when
        the cached file does not match the size and checksum recorded when it was built); sets
        :attr:`bpw_floor`."""
        config = self.config
        grammar_config = GrammarConfig(**config.grammar)
        key = stable_hash(
            {"grammar": asdict(grammar_config), "n": config.n_documents, "seed": config.corpus_seed}
        )
        corpus_dir = self.cache_dir / "corpora" / key
        text_file, meta_file = corpus_dir / "documents.txt", corpus_dir / "meta.json"
        grammar = build_grammar(grammar_config)
        if config.source == "builtin":  # the floor of the whole corpus; a mixture has none
            self.bpw_floor = grammar.entropy_bits_per_word()
        with build_lock(corpus_dir):
            if meta_file.exists():
                _, problem = _read_checked(text_file, meta_file)
                if problem is None:
                    return text_file
                log.warning("corpus cache %s is damaged (%s); generating it again", text_file, problem)
                meta_file.unlink()  # from here on the cache says "not built" until the rebuild is done
            documents = generate_documents(grammar, config.n_documents, config.corpus_seed)
            data = ("\n\n".join(documents) + "\n").encode("utf-8")
            with atomic_path(text_file) as tmp:
                tmp.write_bytes(data)  # bytes: exactly what the fingerprint is of, on every platform
            meta = {
                "n_documents": len(documents),
                "bpw_floor": grammar.entropy_bits_per_word(),
                "documents": fingerprint(data),
            }
            atomic_write_json(meta_file, meta)
            log.info("built corpus %s", text_file)
        return text_file

    # ---------------------------------------------------------------------------------- prepare
    def prepare(self, share: tuple[int, int] | None = None) -> None:
        """Build or open the corpus, tokenizer and token shards (idempotent, safe across processes).

        ``share``: (rank, world size) of this process among those preparing the corpus together; default
        from the environment (:func:`lmexp.data.engine.process_share`: SLURM arrays, srun, torchrun).
        """
        if self.tokenizer is not None:
            return
        specs = self.source_specs()
        tokenizer = self._ready_tokenizer() or self.tokenizer_config
        if self.example_format == "pairs":
            self._prepare_pairs(specs, tokenizer)
            return
        rank, world = share or process_share()
        config, sample = self.config.prepare_config(), self._sample_config()
        self.corpus = prepare_corpus(specs, tokenizer, self.cache_dir, config, sample, rank, world)
        self.tokenizer = self.corpus.tokenizer
        if self.config.source == "mixture" and len(self.corpus.names) > 1:
            self.source_names = self.corpus.names

    def prepare_data(self) -> None:
        """Lightning runs this on local rank 0 of every node: the nodes split the preparation (each unit
        built once when they share the cache directory, every unit on each node when they do not)."""
        trainer = self.trainer
        multi_node = trainer is not None and trainer.num_nodes > 1
        self.prepare((trainer.node_rank, trainer.num_nodes) if multi_node else None)

    def _ready_tokenizer(self) -> Path | None:
        """The tokenizer the run is given instead of training one: a Hugging Face tokenizer's directory (the
        model's own with model=hf or init_from=hf:, or a checkpoint's), or a checkpoint's (or pre-trained
        run's) sentencepiece model, written into the cache; the engine loads either (``load_tokenizer``)."""
        if self.tokenizer_dir is not None:
            return Path(self.tokenizer_dir)
        if self.tokenizer_model is None:
            return None
        return cache_tokenizer_model(self.tokenizer_model, self.cache_dir)

    def _sample_config(self) -> SampleConfig:
        """How many training lines the tokenizer is trained on (``tokenizer.sample_*``)."""
        tokenizer = self.tokenizer_config
        return SampleConfig(
            max_lines=tokenizer.max_training_sentences,
            max_bytes=tokenizer.sample_bytes,
            max_read_bytes=tokenizer.sample_read_bytes,
        )

    def _prepare_pairs(self, specs: list[SourceSpec], tokenizer: TokenizerConfig | Path) -> None:
        """Masked LM: the tokenizer (from a sample, as for blocks) and a bounded set of whole documents."""
        config = self.config.prepare_config()
        plans = [plan_source(spec, self.cache_dir, config) for spec in specs]
        if isinstance(tokenizer, TokenizerConfig):
            self.tokenizer = train_or_load_sampled_tokenizer(
                plans, tokenizer, self.cache_dir, config, self._sample_config()
            )
        else:
            self.tokenizer = load_tokenizer(tokenizer)
        self._pair_documents = bounded_documents(plans, config, self.config.pairs_max_bytes)

    # ------------------------------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        self.prepare()
        if self.datasets:
            return
        if self.example_format == "pairs":
            self._setup_pairs()
            return
        for split in SPLITS:
            if any(split in source.splits for source in self.corpus.sources.values()):
                try:
                    self.datasets[split] = self.corpus.evaluation(split, self.block_size)
                except DataError as error:
                    raise DataError(f"{split} split: {error}") from None

    def _setup_pairs(self) -> None:
        tokenizer = self.tokenizer
        specials = PairSpecials(
            cls_id=tokenizer.special_id("[CLS]"),
            sep_id=tokenizer.special_id("[SEP]"),
            pad_id=tokenizer.pad_id,
        )
        for split, documents in self._pair_documents.items():
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

    # ----------------------------------------------------------------------------------- loaders
    def collate_fn(self, split: str) -> BlockCollate | None:
        if self.example_format == "pairs":
            return None
        return BlockCollate(self.tokenizer.eos_id, self.config.document_mask)

    def train_sampler(self, dataset: Any, rank: int, world: int) -> Any:
        if self.example_format == "pairs":
            return super().train_sampler(dataset, rank, world)
        _, sampler = self.corpus.training(self.block_size, self.seed, rank, world)
        return sampler  # weighted by the sources' weights, resumable from a counter

    def eval_dataloader(self, split: str) -> DataLoader:
        """In-order batches of one source each, sharded across ranks; during training, validation scores
        an evenly spaced subset of about ``data.eval_tokens`` tokens (the same one every time)."""
        if self.example_format == "pairs":
            return super().eval_dataloader(split)
        rank, world = self._rank()
        dataset = self.datasets[split]
        keep = spaced_subset(len(dataset), self.evaluation_blocks(split))
        offsets = dataset.offsets
        groups = [keep[(keep >= a) & (keep < b)] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        batches = EvaluationBatches(groups, self.batch_size, rank, world)
        return DataLoader(dataset, batch_sampler=batches, **self.loader_options(split))

    def evaluation_blocks(self, split: str) -> int:
        """Blocks of ``split`` scored by this evaluation: ``data.eval_tokens`` worth for validation while
        fitting, else 0 (the whole split)."""
        fitting = self.trainer is not None and self.trainer.state.fn == "fit"
        if split != "val" or not fitting or not self.config.eval_tokens:
            return 0
        return math.ceil(self.config.eval_tokens / self.block_size)

    def _too_few_for_a_batch(self, n_examples: int) -> str:
        return (
            f"train split has {n_examples} blocks of data.block_size={self.block_size}, fewer than "
            f"one batch of data.batch_size={self.batch_size}"
        )

    @property
    def has_test(self) -> bool:
        if self.example_format == "pairs":
            return "test" in self._pair_documents
        return self.corpus is not None and any("test" in s.splits for s in self.corpus.sources.values())


def bounded_documents(plans: list[SourcePlan], config: PrepareConfig, max_bytes: int) -> dict[str, list[str]]:
    """Whole documents of every split, by the engine's split rule, at most ``max_bytes`` UTF-8 bytes in all.

    Each source gets an equal share of the budget, read from evenly spaced units (as the tokenizer sample
    is), so a corpus bigger than the budget is sampled across its whole length, not cut after its start.
    """
    by_split: dict[str, list[str]] = {}
    share = max_bytes // max(1, len(plans))
    total_read = total_input = 0
    for plan in plans:
        rule = SplitRule(config.splits, config.split_seed, plan.spec.assign_split)
        dataset = open_hf_dataset(plan.spec) if is_hf_source(plan.spec) else None
        read = 0
        total_input += plan.input_bytes
        for index in units_to_read(plan, share):
            for document in read_unit(plan.units[index], plan.spec, dataset):
                data = document.encode("utf-8")
                by_split.setdefault(rule(data), []).append(document)
                read += len(data)
                if read >= share:
                    break
            if read >= share:
                break
        total_read += read
    if total_read < total_input:
        log.warning(
            "masked LM reads %.1f MiB of the corpus's %.1f MiB (data.pairs_max_bytes=%d)",
            total_read / 2**20, total_input / 2**20, max_bytes,
        )  # fmt: skip
    return {split: by_split[split] for split in SPLITS if split in by_split}


# ------------------------------------------------------------------------------------ lmexp.prepare
def preparation_share(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size) given on the command line, or from the environment when both are null."""
    if rank is None and world_size is None:
        return process_share()
    if rank is None or world_size is None:
        raise ConfigError("rank and world_size: give both (or neither, to read them from the environment)")
    if not (isinstance(rank, int) and isinstance(world_size, int) and 0 <= rank < world_size):
        raise ConfigError(f"rank={rank}: expected an integer in [0, world_size={world_size})")
    return rank, world_size


def prepare_command(cfg: Any) -> PreparedCorpus:
    """``python -m lmexp.prepare``: prepare the corpus of ``cfg.data`` with the tokenizer of
    ``cfg.tokenizer`` (what ``lmexp.train`` with the same overrides reads), print what is in it."""
    import time

    from lmexp.config.schema import collect
    from lmexp.config.settings import group

    problems: list[str] = []
    data = collect(problems, lambda: group(cfg, "data"))
    tokenizer = collect(problems, lambda: group(cfg, "tokenizer"))
    share = collect(problems, lambda: preparation_share(cfg.get("rank"), cfg.get("world_size")))
    if problems:
        raise ConfigError(problems)
    if not isinstance(data, TextDataConfig):
        raise ConfigError(
            "data: lmexp.prepare tokenizes language-model corpora (data=builtin, text, hf or mixture); "
            "labelled data is read by the fine-tuning run itself"
        )
    module = data.build(DataContext(tokenizer, Path(str(cfg.paths.cache_dir)).expanduser()))
    start = time.perf_counter()
    module.prepare(share)
    corpus = module.corpus
    print(
        f"prepared {len(corpus.names)} source(s) in {time.perf_counter() - start:.1f} s as process "
        f"{share[0]} of {share[1]}; tokenizer {corpus.tokenizer.path}"
    )
    for name, source in corpus.sources.items():
        parts = []
        for split in source.splits:
            totals = source.totals(split)
            parts.append(
                f"{split} {totals['n_tokens']:,} tokens, {totals['n_documents']:,} documents, "
                f"{totals['n_bytes'] / 1e6:,.1f} MB"
            )
        print(f"  {name}: {'; '.join(parts)}  ({source.directory})")
    return corpus
