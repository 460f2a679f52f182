"""Labelled data for fine-tuning: JSON-lines and CoNLL readers, and the data module of ``task=classify|ner``.

Sequence classification reads ``{"text": ..., "label": ...}`` rows. Token classification (NER) reads
``{"tokens": [...], "tags": [...]}`` rows or CoNLL files (one ``token ... tag`` per line, a blank line
between sentences). Every problem a user can fix becomes one :class:`~lmexp.errors.DataError` that names
the config key, the file and the line.

Examples are laid out for the model family: ``[CLS] ids [SEP]`` for BERT (the pooled ``[CLS]`` is the
sentence vector), ``[eos] ids`` for GPT and the LSTM (a document starts after eos in pre-training, and
the last real token is the sentence vector). For NER each word is encoded on its own (sentencepiece
gives a word the same pieces alone as in running text); its first sub-token carries the tag and the
others are ignored (label -100) in the loss and the metrics.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import Dataset

from lmexp.cache import files_digest
from lmexp.config.schema import at_least, positive
from lmexp.data.context import DataConfig, DataContext
from lmexp.data.packing import IGNORE_INDEX
from lmexp.data.sampling import ShardedLoaders
from lmexp.data.tokenizer import Tokenizer, TokenizerConfig, train_or_load_tokenizer
from lmexp.errors import ConfigError, DataError

EXAMPLE_FORMATS = ("classify", "ner")
SPLITS = ("train", "val", "test")
_CONLL_SKIP = "-DOCSTART-"  # CoNLL-2003 document separators carry no sentence


# ------------------------------------------------------------------------------------------- records
@dataclass
class Record:
    """One labelled example as read from a file: a text and its label, or words and their tags."""

    line: int
    """Line in its file where the example starts (for error messages)."""
    text: str = ""
    label: str = ""
    tokens: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)


def read_records(path: Path, key: str, example_format: str, file_format: str, fields: dict[str, str]) -> list:
    """The examples of one file; ``fields`` maps ``text``/``label``/``tokens``/``tags`` to field names."""
    text = read_labelled_text(path, key)
    if file_format == "conll":
        return _conll_records(text, path, key)
    if example_format == "classify":
        return [_classify_record(row, line, path, key, fields) for line, row in jsonl_rows(text, path, key)]
    return [_ner_record(row, line, path, key, fields) for line, row in jsonl_rows(text, path, key)]


def read_labelled_text(path: Path, key: str) -> str:
    if not path.is_file():
        raise DataError(f"{key}: {path} does not exist; expected a labelled data file")
    try:
        return path.read_text(encoding="utf-8").removeprefix("\ufeff").replace("\r\n", "\n")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{key}: {path} is not valid UTF-8 (offset {err.start}); expected UTF-8 text"
        ) from None


def jsonl_rows(text: str, path: Path, key: str) -> list[tuple[int, dict]]:
    rows = []
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{key}: {path} line {line_no}: malformed JSON ({err.msg} at column {err.colno})"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{key}: {path} line {line_no}: expected a JSON object, got {type(row).__name__}")
        rows.append((line_no, row))
    return rows


def _field(row: dict, name: str, where: str, expected: str) -> Any:
    if name not in row:
        raise DataError(f"{where}: has no field {name!r}; expected {expected}")
    return row[name]


def _classify_record(row: dict, line: int, path: Path, key: str, fields: dict[str, str]) -> Record:
    where = f"{key}: {path} line {line}"
    text = _field(row, fields["text"], where, f"a string field {fields['text']!r}")
    label = _field(row, fields["label"], where, f"a label field {fields['label']!r}")
    if not isinstance(text, str):
        raise DataError(f"{where}: field {fields['text']!r} is {type(text).__name__}; expected a string")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise DataError(f"{where}: field {fields['label']!r} is {type(label).__name__}; expected a string")
    return Record(line=line, text=text, label=str(label))


def _ner_record(row: dict, line: int, path: Path, key: str, fields: dict[str, str]) -> Record:
    where = f"{key}: {path} line {line}"
    tokens = _field(row, fields["tokens"], where, f"a list of words {fields['tokens']!r}")
    tags = _field(row, fields["tags"], where, f"a list of tags {fields['tags']!r}")
    for name, value in ((fields["tokens"], tokens), (fields["tags"], tags)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(f"{where}: field {name!r} must be a list of strings")
    return _checked_sentence(tokens, tags, line, f"{where}:")


def _checked_sentence(tokens: list[str], tags: list[str], line: int, where: str) -> Record:
    if len(tokens) != len(tags):
        raise DataError(f"{where} {len(tokens)} tokens but {len(tags)} tags; expected one tag per token")
    if not tokens:
        raise DataError(f"{where} empty sentence; expected at least one token")
    if any(not token.strip() for token in tokens):
        raise DataError(f"{where} a token is empty or whitespace; expected words")
    return Record(line=line, tokens=list(tokens), tags=list(tags))


def _conll_records(text: str, path: Path, key: str) -> list[Record]:
    records: list[Record] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    for line_no, line in enumerate([*text.split("\n"), ""], start=1):
        columns = line.split()
        if columns and columns[0] == _CONLL_SKIP:
            continue
        if not columns:
            if tokens:
                records.append(_checked_sentence(tokens, tags, start, f"{key}: {path} line {start}:"))
            tokens, tags = [], []
            continue
        if len(columns) < 2:
            raise DataError(
                f"{key}: {path} line {line_no}: expected a token and its tag separated by whitespace, "
                f"got {line.strip()!r}"
            )
        start = start if tokens else line_no
        tokens.append(columns[0])
        tags.append(columns[-1])
    return records


# ------------------------------------------------------------------------------------------- examples
class LabelledExamples(Dataset):
    """Encoded examples: ``input_ids`` (one row per example) and labels (a class id, or one per token)."""

    def __init__(self, input_ids: list[list[int]], labels: list[Any], n_words: list[int] | None = None):
        self.input_ids = input_ids
        self.labels = labels
        self.n_words = n_words  # NER: how many words fit in data.block_size (the rest are not predicted)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index], "index": index}


class PadCollator:
    """Pads a batch on the right: ``input_ids`` with pad, ``labels`` of NER with -100, plus attention_mask."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(ex["input_ids"]) for ex in examples)
        input_ids = torch.full((len(examples), length), self.pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)  # (B, T)
        for row, ex in enumerate(examples):
            input_ids[row, : len(ex["input_ids"])] = torch.tensor(ex["input_ids"])
            attention_mask[row, : len(ex["input_ids"])] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "index": torch.tensor([ex["index"] for ex in examples]),
        }
        if isinstance(examples[0]["labels"], list):
            labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
            for row, ex in enumerate(examples):
                labels[row, : len(ex["labels"])] = torch.tensor(ex["labels"])
            batch["labels"] = labels
        else:
            batch["labels"] = torch.tensor([ex["labels"] for ex in examples])  # (B,)
        return batch


# ---------------------------------------------------------------------------------------- data module
@dataclass
class LabelledDataConfig(DataConfig):
    """``conf/data/jsonl.yaml`` and ``conll.yaml``: labelled examples for ``task=classify`` and
    ``task=ner``."""

    example_formats: ClassVar[tuple[str, ...]] = EXAMPLE_FORMATS

    format: Literal["jsonl", "conll"] = "jsonl"
    """``jsonl`` (one JSON object per line) or ``conll`` (``token ... tag`` lines; task=ner only)."""
    train_path: str | None = None
    """Training examples; the label set and (without init_from) the tokenizer come from them."""
    val_path: str | None = None
    """Validation examples (needed for training)."""
    test_path: str | None = None
    """Test examples (optional; evaluated after training)."""
    text_field: str = "text"
    """The JSON field holding the text (task=classify)."""
    label_field: str = "label"
    """The JSON field holding the label (task=classify)."""
    tokens_field: str = "tokens"
    """The JSON field holding the words (task=ner)."""
    tags_field: str = "tags"
    """The JSON field holding one tag per word (task=ner)."""
    block_size: int = at_least(128, 3)
    """The most tokens per example, specials included (longer examples are truncated)."""
    batch_size: int = positive(32)
    """Examples per batch on each device."""
    num_workers: int = at_least(0, 0)
    """DataLoader worker processes."""
    n_documents: int | None = None
    """Ignored; accepted so that presets sized for the built-in corpus (``debug=fast``) compose here too."""

    def training_problems(self) -> list[str]:
        return [
            f"data.{split}_path is not set: expected a labelled .{self.format} file"
            for split in ("train", "val")
            if not getattr(self, f"{split}_path")
        ]

    def build(self, context: DataContext) -> LabelledData:
        """The data module of this config (it reads no file until ``prepare()``)."""
        problems = []
        if self.format == "conll" and context.example_format == "classify":
            problems.append(
                "data=conll holds token tags: use it with task=ner (task=classify reads data=jsonl)"
            )
        if context.labels is None:  # training: the label set comes from the training split
            problems += self.training_problems()
        elif not (self.train_path or self.val_path or self.test_path):
            problems.append("data.test_path is not set: expected a labelled file to evaluate on")
        if problems:
            raise ConfigError(problems)
        return LabelledData(self, context)


class LabelledData(ShardedLoaders, LightningDataModule):
    """Labelled examples for ``task=classify`` (text -> label) and ``task=ner`` (words -> tags).

    ``context.given_tokenizer()`` (a pre-trained run's or the model's own tokenizer) is used when given,
    else one is trained on the training split; ``context.labels`` (a checkpoint's label set) likewise, else
    the sorted labels of the training split. Examples are framed for the model kind (``context.layout``).
    """

    def __init__(self, config: LabelledDataConfig, context: DataContext) -> None:
        super().__init__()
        adopt_file_splits(self, config, context)
        self.format = config.format
        self.fields = {
            "text": config.text_field,
            "label": config.label_field,
            "tokens": config.tokens_field,
            "tags": config.tags_field,
        }
        self.example_format = context.example_format
        self.layout = context.layout
        self.labels: list[str] | None = list(context.labels) if context.labels is not None else None
        self.records: dict[str, list[Record]] = {}
        self.datasets: dict[str, LabelledExamples] = {}

    # ---------------------------------------------------------------------------------- prepare
    def prepare(self) -> None:
        """Read every given split, fix the label set and the tokenizer, encode the examples."""
        if self.tokenizer is not None:
            return
        for split in SPLITS:
            if self.paths[split]:
                self.records[split] = self._read_split(split)
        if self.labels is None:
            self.labels = sorted({tag for record in self.records["train"] for tag in self._labels_of(record)})
        for split in SPLITS:
            if split in self.records:
                self._check_labels(split)
        self.tokenizer = self._tokenizer()
        for split, records in self.records.items():
            self.datasets[split] = self._encode(records)

    def prepare_data(self) -> None:
        self.prepare()

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def _read_split(self, split: str) -> list[Record]:
        key, path = f"data.{split}_path", Path(str(self.paths[split])).expanduser()
        records = read_records(path, key, self.example_format, self.format, self.fields)
        if not records:
            raise DataError(f"{key}: {path} has no examples; expected at least one labelled row")
        return records

    def _labels_of(self, record: Record) -> list[str]:
        return [record.label] if self.example_format == "classify" else record.tags

    def _check_labels(self, split: str) -> None:
        known = set(self.labels or [])
        for record in self.records[split]:
            unseen = [label for label in self._labels_of(record) if label not in known]
            if unseen:
                path = Path(str(self.paths[split])).expanduser()
                what = "label" if self.example_format == "classify" else "tag"
                raise DataError(
                    f"data.{split}_path: {path} line {record.line}: {what} {unseen[0]!r} does not occur in "
                    f"the training split (known: {', '.join(sorted(known))})"
                )

    def _tokenizer(self) -> Tokenizer:
        train = self.records.get("train", [])
        return fine_tuning_tokenizer(
            self.given_tokenizer(),
            self.tokenizer_config,
            self.cache_dir,
            self.paths.get("train"),
            f"labelled:{self.example_format}",
            lambda: [r.text if self.example_format == "classify" else " ".join(r.tokens) for r in train],
        )

    # ----------------------------------------------------------------------------------- encode
    def _frame(self) -> tuple[list[int], list[int]]:
        """Token ids before and after an example's own tokens."""
        tokenizer = self.tokenizer
        if self.layout == "cls_sep":
            return [tokenizer.special_id("[CLS]")], [tokenizer.special_id("[SEP]")]
        return [tokenizer.eos_id], []

    def _encode(self, records: list[Record]) -> LabelledExamples:
        prefix, suffix = self._frame()
        budget = self.block_size - len(prefix) - len(suffix)
        label_ids = {label: i for i, label in enumerate(self.labels or [])}
        if self.example_format == "classify":
            encoded = self.tokenizer.encode([r.text for r in records])
            input_ids = [prefix + ids[:budget] + suffix for ids in encoded]
            return LabelledExamples(input_ids, [label_ids[r.label] for r in records])
        words = self.tokenizer.encode([word for r in records for word in r.tokens])
        input_ids, labels, n_words, start = [], [], [], 0
        for record in records:
            pieces = words[start : start + len(record.tokens)]
            start += len(record.tokens)
            ids, tags = align_word_labels(
                pieces, [label_ids[t] for t in record.tags], budget, self.tokenizer.unk_id
            )
            input_ids.append(prefix + ids + suffix)
            labels.append([IGNORE_INDEX] * len(prefix) + tags + [IGNORE_INDEX] * len(suffix))
            n_words.append(sum(tag != IGNORE_INDEX for tag in tags))
        return LabelledExamples(input_ids, labels, n_words)

    # ---------------------------------------------------------------------------------- loaders
    def collate_fn(self, split: str) -> PadCollator:
        return PadCollator(self.tokenizer.pad_id)

    def _too_few_for_a_batch(self, n_examples: int) -> str:
        return (
            f"data.train_path: {n_examples} examples are fewer than one batch of "
            f"data.batch_size={self.batch_size}"
        )

    @property
    def has_test(self) -> bool:
        return bool(self.paths["test"])


def align_word_labels(
    word_pieces: list[list[int]], word_labels: list[int], budget: int, unk_id: int
) -> tuple[list[int], list[int]]:
    """Sub-token ids of the words and their labels: a word's first sub-token has its label, the rest -100.

    A word that encodes to nothing gets one ``unk_id`` so that it can still be labelled. Stops before the
    first word that would not fit in ``budget`` tokens whole (words past it are not predicted).
    """
    ids: list[int] = []
    labels: list[int] = []
    for pieces, label in zip(word_pieces, word_labels, strict=True):
        pieces = list(pieces) or [unk_id]
        if len(ids) + len(pieces) > budget:
            if not ids:  # a single word longer than the budget: keep its first pieces
                ids, labels = pieces[:budget], [label] + [IGNORE_INDEX] * (budget - 1)
            break
        ids.extend(pieces)
        labels.extend([label] + [IGNORE_INDEX] * (len(pieces) - 1))
    return ids, labels


def fine_tuning_tokenizer(
    given: Any,
    config: TokenizerConfig,
    cache_dir: Path,
    train_path: str | None,
    kind: str,
    documents: Callable[[], list[str]],
) -> Any:
    """The tokenizer of a fine-tuning data module: ``given`` when the run has one (a pre-trained run's or a
    checkpoint's, the model's own with model=hf: ``DataContext.given_tokenizer()``), else a sentencepiece
    tokenizer trained on ``documents()`` (the training split's texts), cached by ``kind`` and the training
    file's content."""
    if given is not None:
        return given
    if not train_path:
        raise ConfigError("data.train_path is not set: a tokenizer is trained on the training split")
    corpus_key = f"{kind}:" + files_digest([Path(str(train_path)).expanduser()])
    return train_or_load_tokenizer(documents(), corpus_key, config, cache_dir)


def adopt_file_splits(module: Any, config: Any, context: DataContext) -> None:
    """The settings every fine-tuning data module reads the same way: its split files, loader sizes, and
    from the run (``context``) the tokenizer settings, cache dir, seed and the tokenizer it is given."""
    module.config = config
    module.paths = {"train": config.train_path, "val": config.val_path, "test": config.test_path}
    module.block_size = config.block_size
    module.batch_size = config.batch_size
    module.num_workers = config.num_workers
    module.tokenizer_config = context.tokenizer
    module.cache_dir = Path(context.cache_dir).expanduser()
    module.seed = context.seed
    module.given_tokenizer = context.given_tokenizer  # a checkpoint's, a pre-trained run's, the model's own
    module.tokenizer = None
    module.bpw_floor = None  # fine-tuning data has no entropy floor
