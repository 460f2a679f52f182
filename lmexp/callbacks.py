"""Callbacks lmexp adds to Lightning's own."""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_only

from lmexp.perf import device_peak_flops, flops_per_token, mfu

log = logging.getLogger(__name__)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with a ``last.ckpt`` that follows its schedule and the end of training.

    When the monitored metric (``val/loss``) does not exist yet, ModelCheckpoint postpones a save that
    ``every_n_train_steps`` asks for until the next validation, ``last.ckpt`` included: with validation
    every 5,000 steps and checkpoints every 500, a job killed at step 4,900 would have nothing to resume
    from. Here only the best-by-metric save waits for the metric; ``last.ckpt`` is written on schedule.
    At the end of training ``last.ckpt`` is rewritten when steps ran after its newest save (ModelCheckpoint
    itself does that only when it never saved one), so it always holds the final weights.
    """

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        every = self._every_n_train_steps
        if every >= 1 and trainer.global_step % every == 0:
            self._save_last_if_behind(trainer)  # nothing to do when the save above already happened

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._save_last_if_behind(trainer)
        super().on_train_end(trainer, pl_module)

    def _save_last_if_behind(self, trainer: Any) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):  # skips a step saved already
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _batch_examples(batch: dict[str, Any]) -> int:
    return batch["input_ids"].shape[0]


def _batch_tokens(batch: dict[str, Any]) -> int:
    return batch["input_ids"].numel()


class TokenThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting tokens, with model FLOPs and MFU.

    Logs ``train/device/tokens_per_sec``, ``train/device/samples_per_sec``, ``train/device/flops_per_sec``
    and, on a GPU of the :data:`lmexp.perf.PEAK_FLOPS` table, ``train/device/mfu``; once at the start,
    ``train/global_batch_size`` (sequences per optimizer step over all devices, nodes and accumulated
    micro-batches) and ``train/tokens_per_step``. Its figures are rolling averages over the last
    ``window_size`` steps, so start-up and compilation drop out of them once the window is full.
    ``perf_metrics`` gives the same window's rates for metrics.json, also for runs shorter than the window.
    """

    def __init__(self, window_size: int = 50) -> None:
        super().__init__(batch_size_fn=_batch_examples, length_fn=_batch_tokens, window_size=window_size)
        self.world_size = 1
        self.accumulate = 1
        self.peak_flops: float | None = None  # dense peak of one device at the run's precision
        self.flops_per_token: int | None = None  # of the sequence length of the latest training batch
        self.batch_shape: tuple[int, int] | None = None  # (sequences, tokens per sequence) on one device
        self._flops_seq_len: int | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.world_size = trainer.world_size
        self.accumulate = trainer.accumulate_grad_batches
        # lmexp.perf's table, not Lightning's: Lightning's lists sparse peaks for some chips (H200) and
        # maps others to the wrong entry (an L40S to the L4); MFU is quoted against the dense peak.
        self.peak_flops = device_peak_flops(trainer.strategy.root_device, trainer.precision)
        self.available_flops = self.peak_flops
        for throughput in self._throughputs.values():
            throughput.available_flops = self.peak_flops

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # ThroughputMonitor reads the module's flops_per_batch after every batch.
        rows, seq_len = batch["input_ids"].shape[:2]
        if seq_len != self._flops_seq_len:
            self._flops_seq_len = seq_len
            self.flops_per_token = _model_flops_per_token(pl_module, seq_len)
        if self.flops_per_token is not None:
            pl_module.flops_per_batch = self.flops_per_token * rows * seq_len
        if self.batch_shape is None:
            self.batch_shape = (rows, seq_len)
            self._log_global_batch(trainer)

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
        trainer._logger_connector.log_metrics(
            {key: float(value) for key, value in values.items()}, step=trainer.global_step
        )

    def _compute(self, trainer: Any, iter_num: int | None = None) -> None:
        # Training throughput only (evaluation is still timed, so that its duration stays out of the
        # training rate), with "items" named what they are: tokens.
        if trainer.state.stage != RunningStage.TRAINING or not trainer._logger_connector.should_update_logs:
            return
        metrics = self._throughputs[RunningStage.TRAINING].compute()
        renamed = {
            "train/" + key.replace("items", "tokens").replace("lengths", "tokens"): value
            for key, value in metrics.items()
        }
        trainer._logger_connector.log_metrics(renamed, step=iter_num)

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
        throughput = self._throughputs.get(RunningStage.TRAINING)
        if throughput is None or len(throughput._time) < 2:
            return metrics
        elapsed = throughput._time[-1] - throughput._time[0]
        tokens_per_device = (throughput._lengths[-1] - throughput._lengths[0]) / elapsed
        samples_per_device = (throughput._samples[-1] - throughput._samples[0]) / elapsed
        metrics["perf/tokens_per_sec"] = tokens_per_device * self.world_size
        metrics["perf/samples_per_sec"] = samples_per_device * self.world_size
        utilisation = mfu(tokens_per_device, self.flops_per_token or 0, self.peak_flops)
        if utilisation is not None and self.flops_per_token:
            metrics["perf/mfu"] = utilisation
        return metrics


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
