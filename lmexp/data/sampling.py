"""Samplers and a data loader whose position survives a checkpoint.

Training order is a seeded permutation per epoch, sharded by rank. The loader's state is the number of
batches the trainer has finished in the current epoch (read from the trainer, not counted here, since
Lightning fetches one batch ahead); a resumed run skips exactly those, so no batch is seen twice or
missed after a restart mid-epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

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


class ShardedLoaders:
    """The loaders of a data module over map-style ``self.datasets[split]``, sharded across ranks.

    Training: a per-epoch shuffle, disjoint per rank, resumable mid-epoch. Validation and test: in order,
    each example on exactly one rank. The data module provides ``datasets``, ``batch_size``, ``trainer``
    and ``_loader_options()``; ``_too_few_for_a_batch`` words the error when the train split is too small.
    """

    datasets: dict[str, Any]
    batch_size: int
    seed: int
    trainer: Any

    def _loader_options(self) -> dict[str, Any]:
        raise NotImplementedError

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

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        dataset = self.datasets["train"]
        if len(dataset) // world < self.batch_size:
            raise DataError(f"{self._too_few_for_a_batch(len(dataset))} per device; lower data.batch_size")
        sampler = EpochShuffleSampler(len(dataset), self.seed, rank, world)
        return ResumableLoader(dataset, sampler, self.batch_size, self._progress, **self._loader_options())

    def eval_dataloader(self, split: str) -> DataLoader:
        """In-order loader of ``split``, sharded across ranks."""
        rank, world = self._rank()
        dataset = self.datasets[split]
        sampler = ShardSampler(len(dataset), rank, world)
        return DataLoader(dataset, sampler=sampler, batch_size=self.batch_size, **self._loader_options())

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")
