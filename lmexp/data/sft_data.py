"""The data module of ``task=sft`` (``data=sft``): prompt/completion or chat rows -> packed blocks -> loaders.

Rendering and packing are :mod:`lmexp.data.sft`'s: each row becomes ``[eos] prompt completion [eos]`` (or a
conversation in the plain chat template) with labels on the completion tokens only, and rows are packed whole
into blocks of ``data.block_size`` tokens with ``document_ids``, so that the model (gpt, llama) never lets one
example attend to another. The tokenizer is the pre-trained run's (``init_from``) or one trained on the
training rows' texts. The rows stay available (:attr:`SFTData.records`) for ``lmexp.eval``, which generates
the completions of the test split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from lightning.pytorch import LightningDataModule

from lmexp.config.schema import at_least, positive
from lmexp.data.context import DataConfig, DataContext
from lmexp.data.labelled import adopt_file_splits, fine_tuning_tokenizer
from lmexp.data.sampling import ShardedLoaders
from lmexp.data.sft import PackedBlocks, SFTRecord, pack_examples, read_sft, render_examples
from lmexp.errors import ConfigError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def record_texts(records: list[SFTRecord]) -> list[str]:
    """Every text of the rows (prompts, completions, message contents): what a tokenizer is trained on."""
    texts = []
    for record in records:
        if record.messages is None:
            texts += [record.prompt or "", record.completion or ""]
        else:
            texts += [message["content"] for message in record.messages]
    return [text for text in texts if text.strip()]


@dataclass
class SFTDataConfig(DataConfig):
    """``conf/data/sft.yaml``: prompt -> completion (or chat) rows for ``task=sft``."""

    example_formats: ClassVar[tuple[str, ...]] = ("sft",)

    train_path: str | None = None
    """Training rows: JSON lines ``{"prompt", "completion"}`` or ``{"messages": [{role, content}, ...]}``."""
    val_path: str | None = None
    """Validation rows (needed for training)."""
    test_path: str | None = None
    """Test rows (optional): ``lmexp.eval`` generates their completions and scores them."""
    block_size: int = at_least(256, 2)
    """Tokens per packed block; several short examples share one, none attends to another."""
    overlong: Literal["truncate", "error"] = "truncate"
    """An example longer than a block: ``truncate`` (keep its first block_size tokens) or ``error``."""
    batch_size: int = positive(16)
    """Blocks per batch on each device."""
    num_workers: int = at_least(0, 0)
    """DataLoader worker processes."""
    n_documents: int | None = None
    """Ignored; accepted so that presets sized for the built-in corpus (``debug=fast``) compose here too."""

    def training_problems(self) -> list[str]:
        return [
            f"data.{split}_path is not set: expected a .jsonl file of prompt/completion or messages rows"
            for split in ("train", "val")
            if not getattr(self, f"{split}_path")
        ]

    def build(self, context: DataContext) -> SFTData:
        """The data module of this config (it reads no file until ``prepare()``)."""
        if not (self.train_path or self.val_path or self.test_path):
            raise ConfigError("data.test_path is not set: expected a .jsonl file of rows to evaluate on")
        return SFTData(self, context)


class SFTData(ShardedLoaders, LightningDataModule):
    """Packed prompt/completion blocks for ``task=sft``.

    Every example starts after an eos, as a document does in pre-training (the ``eos`` layout of gpt and
    llama); its completion tokens (and the closing eos) are the only targets.
    """

    def __init__(self, config: SFTDataConfig, context: DataContext) -> None:
        super().__init__()
        adopt_file_splits(self, config, context)
        self.labels: list[str] | None = None
        self.records: dict[str, list[SFTRecord]] = {}
        self.datasets: dict[str, PackedBlocks] = {}

    def prepare(self, pack: bool = True) -> None:
        """Read every given split and fix the tokenizer; with ``pack``, render and pack every split."""
        if self.tokenizer is None:
            for split in SPLITS:
                if self.paths[split]:
                    self.records[split] = read_sft(Path(str(self.paths[split])), f"data.{split}_path")
            train = self.records.get("train", [])
            self.tokenizer = fine_tuning_tokenizer(
                self.given_tokenizer(),
                self.tokenizer_config,
                self.cache_dir,
                self.paths["train"],
                "sft",
                lambda: record_texts(train),
            )
        if pack and not self.datasets:
            for split, records in self.records.items():
                self.datasets[split] = self._packed(split, records)

    def _packed(self, split: str, records: list[SFTRecord]) -> PackedBlocks:
        rendered = render_examples(records, self.tokenizer, start_ids=self.start_ids)
        blocks = pack_examples(rendered, self.block_size, self.tokenizer.pad_id, self.config.overlong)
        stats = blocks.stats
        log.info(
            "data.%s_path: %d examples in %d blocks of %d tokens (%.0f%% filled, %d learned tokens)",
            split, stats.n_examples, stats.n_blocks, self.block_size, 100 * stats.fill, stats.n_learned,
        )  # fmt: skip
        if stats.n_truncated:
            log.warning(
                "data.%s_path: %d examples are longer than data.block_size=%d and were truncated "
                "(%d of them dropped: nothing left to learn, e.g. %s)",
                split, stats.n_truncated, self.block_size, stats.n_dropped,
                stats.dropped[0] if stats.dropped else "none",
            )  # fmt: skip
        return blocks

    @property
    def start_ids(self) -> tuple[int, ...]:
        """Ids before every example: the document start that gpt and llama were pre-trained with."""
        return (self.tokenizer.eos_id,)

    def prepare_data(self) -> None:
        self.prepare()

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def _too_few_for_a_batch(self, n_examples: int) -> str:
        return (
            f"data.train_path: its examples pack into {n_examples} blocks, fewer than one batch of "
            f"data.batch_size={self.batch_size}"
        )

    @property
    def has_test(self) -> bool:
        return bool(self.paths["test"])
