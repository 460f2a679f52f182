"""The data module of ``task=qa`` (``data=squad``): SQuAD files -> windowed features -> loaders.

Reading, windowing and answer extraction are :mod:`lmexp.data.squad`'s; this module wires them to a run:
each split's questions are read (``.json`` SQuAD files or ``.jsonl`` in Hugging Face's squad layout), the
tokenizer is the pre-trained run's (``init_from``) or one trained on the training contexts and questions,
and every question becomes one or more ``[CLS] question [SEP] context [SEP]`` windows of at most
``data.block_size`` tokens. The task reads a split's questions and windows back (:meth:`SquadData.qa_split`)
to turn the windows' logits into answers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from lightning.pytorch import LightningDataModule

from lmexp.config.schema import at_least, positive
from lmexp.data.context import DataConfig, DataContext
from lmexp.data.labelled import adopt_file_splits, fine_tuning_tokenizer
from lmexp.data.sampling import ShardedLoaders
from lmexp.data.squad import (
    QACollator,
    QAExample,
    QAFeature,
    QAFeatureDataset,
    build_features,
    read_squad,
    window_problems,
)
from lmexp.errors import ConfigError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


@dataclass
class SquadDataConfig(DataConfig):
    """``conf/data/squad.yaml``: extractive question answering data for ``task=qa``."""

    example_formats: ClassVar[tuple[str, ...]] = ("qa",)

    train_path: str | None = None
    """Training questions: a SQuAD ``.json`` file or ``.jsonl`` rows ``{id, question, context, answers}``."""
    val_path: str | None = None
    """Validation questions (needed for training; ``val/exact_match`` and ``val/f1`` are computed on them)."""
    test_path: str | None = None
    """Test questions (optional; evaluated after training)."""
    block_size: int = at_least(384, 8)
    """The most tokens per window: ``[CLS] question [SEP] context-window [SEP]``."""
    stride: int = at_least(128, 0)
    """Tokens shared by consecutive windows of a context longer than one window."""
    max_question_len: int = positive(64)
    """The most question tokens kept (the rest are cut)."""
    batch_size: int = positive(32)
    """Windows per batch on each device."""
    num_workers: int = at_least(0, 0)
    """DataLoader worker processes."""
    n_documents: int | None = None
    """Ignored; accepted so that presets sized for the built-in corpus (``debug=fast``) compose here too."""

    def problems(self) -> list[str]:
        problems = window_problems(self.block_size, self.stride, self.max_question_len)
        return [p.replace("data.max_len", "data.block_size") for p in problems]

    def training_problems(self) -> list[str]:
        return [
            f"data.{split}_path is not set: expected a SQuAD .json or .jsonl file"
            for split in ("train", "val")
            if not getattr(self, f"{split}_path")
        ]

    def build(self, context: DataContext) -> SquadData:
        """The data module of this config (it reads no file until ``prepare()``)."""
        if not (self.train_path or self.val_path or self.test_path):
            raise ConfigError("data.test_path is not set: expected a SQuAD file to evaluate on")
        return SquadData(self, context)


class SquadData(ShardedLoaders, LightningDataModule):
    """SQuAD questions as windowed features for ``task=qa``; ``qa_split(split)`` gives them back."""

    def __init__(self, config: SquadDataConfig, context: DataContext) -> None:
        super().__init__()
        adopt_file_splits(self, config, context)
        self.labels: list[str] | None = None  # QA has no label set
        self.examples: dict[str, list[QAExample]] = {}
        self.features: dict[str, list[QAFeature]] = {}
        self.datasets: dict[str, QAFeatureDataset] = {}

    def prepare(self) -> None:
        """Read every given split, fix the tokenizer, cut every question into windows."""
        if self.tokenizer is not None:
            return
        for split in SPLITS:
            if self.paths[split]:
                self.examples[split] = read_squad(Path(str(self.paths[split])), f"data.{split}_path")
        train = self.examples.get("train", [])
        self.tokenizer = fine_tuning_tokenizer(
            self.given_tokenizer(),
            self.tokenizer_config,
            self.cache_dir,
            self.paths["train"],
            "squad",
            lambda: [text for e in train for text in (e.context, e.question)],
        )
        cls_id, sep_id = self.tokenizer.special_id("[CLS]"), self.tokenizer.special_id("[SEP]")
        for split, examples in self.examples.items():
            features = build_features(
                examples,
                self.tokenizer,
                cls_id,
                sep_id,
                max_len=self.block_size,
                stride=self.config.stride,
                max_question_len=self.config.max_question_len,
            )
            self.features[split] = features
            self.datasets[split] = QAFeatureDataset(features)
            log.info("data.%s_path: %d questions in %d windows", split, len(examples), len(features))

    def prepare_data(self) -> None:
        self.prepare()

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def qa_split(self, split: str) -> tuple[list[QAExample], list[QAFeature]]:
        """The questions of ``split`` and their windows (``index`` in a batch is a window's position)."""
        return self.examples[split], self.features[split]

    def collate_fn(self, split: str) -> QACollator:
        return QACollator(self.tokenizer.pad_id)

    def _too_few_for_a_batch(self, n_examples: int) -> str:
        return (
            f"data.train_path: {n_examples} windows are fewer than one batch of "
            f"data.batch_size={self.batch_size}"
        )

    @property
    def has_test(self) -> bool:
        return bool(self.paths["test"])
