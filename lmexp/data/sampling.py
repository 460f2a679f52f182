"""Samplers and a data loader whose position survives a checkpoint.

Training order is a seeded permutation per epoch, sharded by rank. The loader's state is the number of
batches the trainer has finished in the current epoch (read from the trainer, not counted here, since
Lightning fetches one batch ahead); a resumed run skips exactly those, so no batch is seen twice or
missed after a restart mid-epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lmexp.errors import DataError


class EpochShuffleSampler(Sampler[int]):
    """A fresh seeded permutation each epoch; rank r of w takes every w-th index (equal shares)."""

    def __init__(self, n_items: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.n_items = n_items
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, items to skip) for the next iteration

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, items_done: int) -> None:
        """Skip ``items_done`` items the next time epoch ``epoch`` is iterated."""
        self._resume = (epoch, items_done)

    def _order(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n_items, generator=generator).tolist()
        else:
            order = list(range(self.n_items))
        per_rank = self.n_items // self.world_size  # equal shares keep DDP ranks in step
        return order[self.rank : per_rank * self.world_size : self.world_size]

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self._resume is not None and self._resume[0] == self.epoch:
            order = order[self._resume[1] :]
        self._resume = None
        return iter(order)

    def __len__(self) -> int:
        return self.n_items // self.world_size


class ShardSampler(Sampler[int]):
    """Evaluation order: rank r of w takes items r, r+w, r+2w, ... — every item exactly once overall."""

    def __init__(self, n_items: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, n_items, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning saves in checkpoints (it has ``state_dict``/``load_state_dict``).

    ``progress`` returns (epoch, batches finished in that epoch) from the trainer.
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: EpochShuffleSampler,
        batch_size: int,
        progress: Callable[[], tuple[int, int]],
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, sampler=sampler, batch_size=batch_size, drop_last=True, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch, batches_done = self.progress()
        return {"epoch": epoch, "batches_done": batches_done, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume(state["epoch"], state["batches_done"] * state["batch_size"])


class EvaluationBatches(Sampler[list[int]]):
    """In-order evaluation batches of one rank that never mix two sources.

    ``groups`` holds the dataset indices of each source, in order (all of a split, or an evenly spaced
    subset of it). Rank r of w takes every w-th index of each group from its r-th, so over all ranks every
    index is used exactly once, and cuts its share of each group into batches of ``batch_size`` (the last
    one of a group may be short), taken from the groups in turn. A batch is therefore one source's, which
    per-source metrics need without a second forward pass. Rank 0 has the most batches (:attr:`most_batches`).
    """

    def __init__(self, groups: Sequence[Sequence[int]], batch_size: int, rank: int = 0, world_size: int = 1):
        self.groups = [np.asarray(group, dtype=np.int64) for group in groups]
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def _batches_of(self, rank: int) -> int:
        shares = (len(group[rank :: self.world_size]) for group in self.groups)
        return sum(-(-share // self.batch_size) for share in shares)

    def __iter__(self) -> Iterator[list[int]]:
        # Round robin over the groups, so that an evaluation cut short (trainer.limit_val_batches) still
        # scores every source.
        batches = [self._group_batches(group) for group in self.groups]
        while batches:
            for batch_iter in list(batches):
                batch = next(batch_iter, None)
                if batch is None:
                    batches.remove(batch_iter)
                else:
                    yield batch

    def _group_batches(self, group: np.ndarray) -> Iterator[list[int]]:
        share = group[self.rank :: self.world_size]
        for start in range(0, len(share), self.batch_size):
            yield share[start : start + self.batch_size].tolist()

    def __len__(self) -> int:
        return self._batches_of(self.rank)

    @property
    def most_batches(self) -> int:
        """Batches of the rank with the most (rank 0): what every FSDP rank must run."""
        return self._batches_of(0)


def spaced_subset(n_items: int, n_keep: int) -> np.ndarray:
    """``n_keep`` indices of ``range(n_items)`` spread evenly from first to last (all of them when
    ``n_keep`` is 0 or at least ``n_items``): a fixed subset that covers the whole range."""
    if not n_keep or n_keep >= n_items:
        return np.arange(n_items, dtype=np.int64)
    return np.unique(np.linspace(0, n_items - 1, n_keep).round().astype(np.int64))


class ShardedLoaders:
    """The loaders of a data module over map-style ``self.datasets[split]``, sharded across ranks.

    Training: a per-epoch shuffle (or the module's own :meth:`train_sampler`), disjoint per rank,
    resumable mid-epoch. Validation and test: in order, each example on exactly one rank. The data module
    provides ``datasets``, ``batch_size``, ``num_workers``, ``seed`` and ``trainer``, and may override
    :meth:`collate_fn`; ``_too_few_for_a_batch`` words the error when the train split is too small.
    """

    datasets: dict[str, Any]
    batch_size: int
    num_workers: int
    seed: int
    trainer: Any

    def collate_fn(self, split: str) -> Callable | None:
        """How the examples of ``split`` become a batch (None: torch's default collation)."""
        return None

    def loader_options(self, split: str) -> dict[str, Any]:
        """DataLoader options shared by every loader of the module."""
        pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return {
            "num_workers": self.num_workers,
            "pin_memory": pin,  # page-locked batches: the copy to the GPU can overlap compute
            "persistent_workers": self.num_workers > 0,
            "collate_fn": self.collate_fn(split),
            # Each loader iterator draws a seed; from its own generator, not torch's global one, so
            # dropout's random stream depends only on the training steps (and resumes exactly).
            "generator": torch.Generator().manual_seed(self.seed),
        }

    def _too_few_for_a_batch(self, n_examples: int) -> str:
        return (
            f"train split has {n_examples} examples, "
            f"fewer than one batch of data.batch_size={self.batch_size}"
        )

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _progress(self) -> tuple[int, int]:
        trainer = self.trainer
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_sampler(self, dataset: Any, rank: int, world: int) -> Sampler[int]:
        """The training order of this rank (with ``set_epoch`` and ``resume(epoch, items_done)``)."""
        return EpochShuffleSampler(len(dataset), self.seed, rank, world)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        dataset = self.datasets["train"]
        sampler = self.train_sampler(dataset, rank, world)
        if len(sampler) < self.batch_size:
            raise DataError(f"{self._too_few_for_a_batch(len(dataset))} per device; lower data.batch_size")
        return ResumableLoader(
            dataset, sampler, self.batch_size, self._progress, **self.loader_options("train")
        )

    def eval_dataloader(self, split: str) -> DataLoader:
        """In-order loader of ``split``, sharded across ranks."""
        rank, world = self._rank()
        dataset = self.datasets[split]
        sampler = ShardSampler(len(dataset), rank, world)
        return DataLoader(dataset, sampler=sampler, batch_size=self.batch_size, **self.loader_options(split))

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")
