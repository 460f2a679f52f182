"""Throughput: tokens, samples and FLOPs per second of training, and MFU on GPUs.

Lightning's ``Throughput`` (``lightning.fabric.utilities.throughput``) computes the rolling rates; this
callback feeds it token counts and model FLOPs, times training only (validation pauses the clock), and
writes the run's rates into metrics.json.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_only

from lmexp.training.compat import batches_that_stepped, is_accumulating, logs_this_step
from lmexp.training.perf import device_peak_flops, flops_per_token, mfu

log = logging.getLogger(__name__)


class TokenThroughput(Callback):
    """Logs ``train/device/tokens_per_sec``, ``train/device/samples_per_sec``, ``train/device/flops_per_sec``
    and, on a GPU of the :data:`lmexp.training.perf.PEAK_FLOPS` table, ``train/device/mfu``; once at the
    start, ``train/global_batch_size`` (sequences per optimizer step over all devices, nodes and accumulated
    micro-batches) and ``train/tokens_per_step``.

    Rates are rolling averages over the last ``window_size`` steps, so start-up and compilation drop out of
    them once the window is full. ``perf_metrics`` gives the same window's rates for metrics.json, also for
    runs shorter than the window.
    """

    def __init__(self, window_size: int = 50) -> None:
        self.window_size = window_size
        self.world_size = 1
        self.accumulate = 1
        self.peak_flops: float | None = None  # dense peak of one device at the run's precision
        self.flops_per_token: int | None = None  # of the sequence length of the latest training batch
        self.batch_shape: tuple[int, int] | None = None  # (sequences, tokens per sequence) on one device
        self._flops_seq_len: int | None = None
        self._throughput: Throughput | None = None
        self._window: deque[tuple[float, int, int]] = deque(maxlen=window_size)  # (time, samples, tokens)
        self._clock_start = 0.0  # training time = now - _clock_start (validation time is added to it)
        self._paused_at: float | None = None
        self._samples = self._tokens = self._batches = 0

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.world_size = trainer.world_size
        self.accumulate = trainer.accumulate_grad_batches
        # lmexp.training.perf's table, not Lightning's: Lightning's lists sparse peaks for some chips (H200)
        # and maps others to the wrong entry (an L40S to the L4); MFU is quoted against the dense peak.
        self.peak_flops = device_peak_flops(trainer.strategy.root_device, trainer.precision)
        self._throughput = Throughput(
            available_flops=self.peak_flops, world_size=trainer.world_size, window_size=self.window_size
        )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._clock_start = time.perf_counter()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # The module's flops_per_batch is read after every batch.
        rows, seq_len = batch["input_ids"].shape[:2]
        if seq_len != self._flops_seq_len:
            self._flops_seq_len = seq_len
            self.flops_per_token = _model_flops_per_token(pl_module, seq_len)
        if self.flops_per_token is not None:
            pl_module.flops_per_batch = self.flops_per_token * rows * seq_len
        if self.batch_shape is None:
            self.batch_shape = (rows, seq_len)
            self._log_global_batch(trainer)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.strategy.root_device.type == "cuda":
            import torch

            torch.cuda.synchronize()  # the clock must see the step's kernels finished
        elapsed = time.perf_counter() - self._clock_start
        self._batches += 1
        self._samples += int(batch["input_ids"].shape[0])
        self._tokens += int(batch["input_ids"].numel())
        self._window.append((elapsed, self._samples, self._tokens))
        self._throughput.update(
            time=elapsed,
            batches=self._batches,
            samples=self._samples,
            lengths=self._tokens,
            flops=getattr(pl_module, "flops_per_batch", None),
        )
        if not is_accumulating(trainer) and logs_this_step(trainer) and trainer.is_global_zero:
            rates = self._throughput.compute()
            # Lightning's names, with "items" (and the running "lengths") named what they are: tokens.
            _log(trainer, {"train/" + _tokens(key): value for key, value in rates.items()})

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._paused_at = time.perf_counter()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._paused_at is not None:  # validation time is not training time
            self._clock_start += time.perf_counter() - self._paused_at
            self._paused_at = None

    @property
    def global_batch_size(self) -> int | None:
        """Sequences per optimizer step: per-device batch x devices x nodes x accumulated micro-batches."""
        if self.batch_shape is None:
            return None
        return self.batch_shape[0] * self.world_size * self.accumulate

    @rank_zero_only
    def _log_global_batch(self, trainer: Any) -> None:
        rows, seq_len = self.batch_shape
        tokens = self.global_batch_size * seq_len
        log.info(
            "global batch: %d sequences (data.batch_size=%d per device x %d devices over all nodes x %d "
            "accumulated) = %d tokens per optimizer step; the learning rate is not rescaled",
            self.global_batch_size, rows, self.world_size, self.accumulate, tokens,
        )  # fmt: skip
        values = {"train/global_batch_size": self.global_batch_size, "train/tokens_per_step": tokens}
        _log(trainer, {key: float(value) for key, value in values.items()}, step=trainer.global_step)

    def perf_metrics(self) -> dict[str, float]:
        """``perf/*`` for metrics.json: rates over all devices (training only), FLOPs, MFU, global batch.

        ``perf/mfu`` only where the device's peak is known (a GPU of the table); never on a CPU.
        """
        metrics: dict[str, float] = {}
        if self.flops_per_token is not None:
            metrics["perf/flops_per_token"] = float(self.flops_per_token)
        if self.batch_shape is not None:
            metrics["perf/global_batch_size"] = float(self.global_batch_size)
            metrics["perf/tokens_per_step"] = float(self.global_batch_size * self.batch_shape[1])
        metrics.update(_peak_memory())
        if len(self._window) < 2:
            return metrics
        (t0, samples0, tokens0), (t1, samples1, tokens1) = self._window[0], self._window[-1]
        tokens_per_device = (tokens1 - tokens0) / (t1 - t0)
        metrics["perf/tokens_per_sec"] = tokens_per_device * self.world_size
        metrics["perf/samples_per_sec"] = (samples1 - samples0) / (t1 - t0) * self.world_size
        utilisation = mfu(tokens_per_device, self.flops_per_token or 0, self.peak_flops)
        if utilisation is not None and self.flops_per_token:
            metrics["perf/mfu"] = utilisation
        return metrics


def _log(trainer: Any, values: dict[str, float], step: int | None = None) -> None:
    """Log ``values`` to every logger, by default at the step of the row Lightning logs for this batch."""
    step = batches_that_stepped(trainer) if step is None else step
    values = {**values, "epoch": float(trainer.current_epoch)}  # as Lightning's own rows carry it
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)


def _tokens(key: str) -> str:
    return key.replace("items", "tokens").replace("lengths", "tokens")


def _model_flops_per_token(pl_module: Any, seq_len: int) -> int | None:
    """Training FLOPs per token of the task's model, from its config (None if it has none)."""
    config = getattr(getattr(pl_module, "model", None), "config", None)
    if config is None or not hasattr(config, "build"):
        return None
    # Counted on a meta-device copy: independent of sharding, compilation and wrappers.
    return flops_per_token(config, seq_len)


def _peak_memory() -> dict[str, float]:
    """``perf/peak_memory_gib``: the most GPU memory this process's tensors held (CUDA only)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"perf/peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
