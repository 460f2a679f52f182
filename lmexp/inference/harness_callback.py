"""Run lm-evaluation-harness tasks during training; log ``harness/<task>/<metric>`` with the run's metrics."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from lmexp.errors import ConfigError

log = logging.getLogger(__name__)
KEY = "callbacks.harness"


class HarnessCallback(Callback):
    """Every ``every_n_train_steps`` optimizer steps, scores the task's language model on harness tasks.

    Runs on global rank 0 only (the other ranks wait for it at their next collective), on the unwrapped
    model in eval mode, and restores the model's mode and every global random state afterwards, so the
    training that follows is the same as without the callback. Values go to all of the trainer's loggers at
    the current step and stay in :attr:`history` (``{step: metrics}``).

    Args:
        tasks: lm-eval task names, or names defined under ``include_path``; None or [] = off.
        every_n_train_steps: evaluate after every this many optimizer steps.
        include_path: a directory of task YAML files.
        limit: examples per task (a fraction if < 1); None = all. Keep it small: it runs inside training.
        num_fewshot: few-shot examples; None = each task's own setting.
        seed: seed of the harness (few-shot sampling, sampled generation).
        batch_size: windows per forward pass.
        max_length: the longest window scored; None = the data module's ``block_size`` (positions past it
            were never trained), else the model's ``max_seq_len``.
        bootstrap_iters: see :func:`lmexp.inference.harness.run_harness`.
        tokenizer: the run's tokenizer; None = the data module's ``tokenizer``.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        every_n_train_steps: int,
        include_path: str | Path | None = None,
        limit: int | float | None = None,
        num_fewshot: int | None = None,
        seed: int = 0,
        batch_size: int = 8,
        max_length: int | None = None,
        bootstrap_iters: int = 100,
        tokenizer: Any = None,
    ) -> None:
        problems = []
        if isinstance(every_n_train_steps, bool) or not isinstance(every_n_train_steps, int):
            problems.append(f"{KEY}.every_n_train_steps={every_n_train_steps!r}: expected an integer >= 1")
        elif every_n_train_steps < 1:
            problems.append(f"{KEY}.every_n_train_steps={every_n_train_steps}: expected an integer >= 1")
        if tasks is not None and (isinstance(tasks, str) or not isinstance(tasks, Sequence)):
            problems.append(f"{KEY}.tasks={tasks!r}: expected a list of task names, e.g. [hellaswag]")
        if problems:
            raise ConfigError(problems)
        # A Hydra ListConfig becomes a list; none (null or []) turns the callback off, so a config can
        # always carry it and a run switches it on with callbacks.harness.tasks=[...].
        self.tasks = [str(task) for task in tasks or []]
        self.every_n_train_steps = every_n_train_steps
        self.include_path = include_path
        self.limit, self.num_fewshot, self.seed = limit, num_fewshot, seed
        self.batch_size, self.max_length, self.bootstrap_iters = batch_size, max_length, bootstrap_iters
        self.tokenizer = tokenizer
        self.history: dict[int, dict[str, float]] = {}
        self._last_step = -1

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Fail before training: an unknown task name, or weights sharded across ranks."""
        if stage != "fit" or not self.tasks:
            return
        if "FSDP" in type(trainer.strategy).__name__:
            raise ConfigError(
                f"{KEY}: not available with trainer=fsdp (each rank holds a shard of the weights); "
                "evaluate the checkpoint with python -m lmexp.eval harness.tasks=[...] instead"
            )
        if trainer.is_global_zero:
            from lmexp.inference.harness import task_manager

            task_manager(self.tasks, self.include_path, KEY)  # indexes the tasks once; raises on a bad name

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self.tasks:
            return
        # With gradient accumulation this hook runs per micro-batch; evaluate once per optimizer step.
        if step == 0 or step % self.every_n_train_steps or step == self._last_step:
            return
        self._last_step = step
        if not trainer.is_global_zero:
            return
        metrics = self.evaluate(trainer, pl_module)
        self.history[step] = metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        log.info("harness at step %d: %s", step, metrics)

    def summary_metrics(self) -> dict[str, float]:
        """The latest evaluation's values, for the run's metrics.json (nothing when it never ran)."""
        return dict(self.history[max(self.history)]) if self.history else {}

    def evaluate(self, trainer: Any, pl_module: Any) -> dict[str, float]:
        """The harness metrics of ``pl_module.model`` now; its train/eval mode is restored afterwards."""
        from lmexp.inference.harness import HarnessLM, run_harness

        model = pl_module.model
        datamodule = getattr(trainer, "datamodule", None)
        tokenizer = self.tokenizer or getattr(datamodule, "tokenizer", None)
        if tokenizer is None:
            raise ConfigError(f"{KEY}: the data module has no tokenizer; pass callbacks.harness.tokenizer")
        max_length = self.max_length or getattr(datamodule, "block_size", None)
        was_training = model.training
        try:
            lm = HarnessLM.from_lmexp(model, tokenizer, max_length=max_length, batch_size=self.batch_size)
            return run_harness(
                lm,
                self.tasks,
                self.include_path,
                self.limit,
                self.num_fewshot,
                self.seed,
                bootstrap_iters=self.bootstrap_iters,
                key=KEY,
            )
        finally:
            model.train(was_training)
