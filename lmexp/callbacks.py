"""Callbacks lmexp adds to Lightning's own."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage


def _batch_examples(batch: dict[str, Any]) -> int:
    return batch["input_ids"].shape[0]


def _batch_tokens(batch: dict[str, Any]) -> int:
    return batch["input_ids"].numel()


class TokenThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting tokens: logs ``train/device/tokens_per_sec`` and friends.

    Its figures are rolling averages over the last ``window_size`` steps, so start-up and compilation
    drop out of them once the window is full. ``perf_metrics`` gives the same window's rates for
    metrics.json, also for runs shorter than the window.
    """

    def __init__(self, window_size: int = 50) -> None:
        super().__init__(batch_size_fn=_batch_examples, length_fn=_batch_tokens, window_size=window_size)
        self.world_size = 1

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.world_size = trainer.world_size

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
        """``perf/tokens_per_sec`` and ``perf/samples_per_sec`` over all devices (training only)."""
        throughput = self._throughputs.get(RunningStage.TRAINING)
        if throughput is None or len(throughput._time) < 2:
            return {}
        elapsed = throughput._time[-1] - throughput._time[0]
        tokens = throughput._lengths[-1] - throughput._lengths[0]
        samples = throughput._samples[-1] - throughput._samples[0]
        return {
            "perf/tokens_per_sec": tokens / elapsed * self.world_size,
            "perf/samples_per_sec": samples / elapsed * self.world_size,
        }
