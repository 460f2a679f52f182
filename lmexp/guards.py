"""What keeps a run's state safe: atomic checkpoint files, a guard against non-finite losses, and a
clean stop on preemption signals.

All three are Lightning plug-ins (a ``CheckpointIO`` and two callbacks) that ``lmexp.builders`` adds to
every run; none of them needs configuring beyond ``trainer.skip_nonfinite``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lmexp.cache import atomic_path
from lmexp.errors import Preempted, UserError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- checkpoints
class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file next to the target, ``fsync``, then rename over it.

    Lightning's own writer stages the file in the system temp dir and moves it into place; when that dir is
    on another filesystem (a node-local /tmp, checkpoints on shared storage) the move is a copy, and a job
    killed during it leaves a truncated checkpoint. A rename within one directory is atomic: a reader sees
    the old file or the new one, never half of one.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's transaction is what exists there
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())

    def load_checkpoint(self, path: Any, *args: Any, weights_only: bool | None = None, **kwargs: Any) -> Any:
        # lmexp writes only tensors and plain data, so resuming never needs to unpickle arbitrary objects.
        weights_only = True if weights_only is None else weights_only
        return super().load_checkpoint(path, *args, weights_only=weights_only, **kwargs)


# ---------------------------------------------------------------------------------------- non-finite
class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite."""


class NonFiniteGuard(Callback):
    """Stop at the first non-finite training loss, or (``skip=True``) skip such batches and count them.

    Stopping (the default) costs no host sync per step: each step only records on the device whether its
    loss was finite, and the step, epoch and loss of the first one that was not. The record is read at
    logging intervals, before validation and before any checkpoint is written; a bad record then stops the
    run naming that first step. So no checkpoint ever holds weights updated from a non-finite loss; at
    most ``trainer.log_every_n_steps`` steps of compute are wasted after one.

    Skipping must decide before the optimizer step, so it reads one scalar per step: it drops the batch's
    gradients (set to None, which AdamW and SGD treat as "no update for this parameter"), so neither the
    weights nor the optimizer moments see the bad batch; the step still counts towards
    ``trainer.max_steps``. Under DDP the ranks agree on every decision, so all of them stop or skip together.
    """

    def __init__(self, skip: bool = False) -> None:
        self.skip = skip
        self.skipped = 0
        self._drop_gradients = False
        # On the device: [step, epoch, loss] of the first non-finite step; step -1 while there is none.
        self._first_bad: torch.Tensor | None = None

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        loss = loss.detach()
        if not self.skip:
            self._record(trainer, loss)
            return
        finite = bool(torch.isfinite(loss).all())
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        self.skipped += 1
        self._drop_gradients = True
        log.warning(
            "step %d: non-finite training loss, batch skipped (%d so far)", trainer.global_step, self.skipped
        )

    def _record(self, trainer: Any, loss: torch.Tensor) -> None:
        """Remember the first non-finite step, with device ops only (nothing waits for the device)."""
        if self._first_bad is None or self._first_bad.device != loss.device:
            self._first_bad = torch.tensor([-1.0, 0.0, 0.0], device=loss.device, dtype=torch.float64)
        value = loss.double().mean()
        step, epoch = float(trainer.global_step), float(trainer.current_epoch)
        now = torch.stack([torch.full_like(value, step), torch.full_like(value, epoch), value])
        first = ~torch.isfinite(value) & (self._first_bad[0] < 0)
        self._first_bad = torch.where(first, now, self._first_bad)

    def _stop_if_recorded(self, trainer: Any) -> None:
        if self.skip or self._first_bad is None:
            return
        bad = bool(self._first_bad[0] >= 0)  # the only read from the device, at check points
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)  # any rank
        if not bad:
            return
        step, epoch, value = (float(v) for v in self._first_bad.tolist())
        if step < 0:  # another rank saw it: its own message names the step
            raise NonFiniteLossError("training loss is not finite on another rank; see that rank's error")
        checkpoint = _last_checkpoint_path(trainer)
        kept = f"; the last good checkpoint is {checkpoint}" if checkpoint and checkpoint.exists() else ""
        raise NonFiniteLossError(
            f"training loss is {value} at step {int(step)} (epoch {int(epoch)}){kept}; lower optim.lr, or "
            "set trainer.skip_nonfinite=true to skip such batches"
        )

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer._logger_connector.should_update_logs:  # a logging interval: reading values is due anyway
            self._stop_if_recorded(trainer)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._stop_if_recorded(trainer)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self._stop_if_recorded(trainer)  # before anything is written: a checkpoint never holds bad weights

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._stop_if_recorded(trainer)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self._drop_gradients:
            optimizer.zero_grad(set_to_none=True)
            self._drop_gradients = False
            pl_module.log("train/skipped_nonfinite", float(self.skipped), rank_zero_only=True)

    def perf_metrics(self) -> dict[str, float]:
        """``train/skipped_nonfinite`` for metrics.json, when batches were skipped."""
        return {"train/skipped_nonfinite": float(self.skipped)} if self.skip else {}

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


# ---------------------------------------------------------------------------------------- preemption
class Preemption(Callback):
    """Save ``last.ckpt`` at a batch boundary and stop when the job gets SIGTERM or SIGUSR1.

    SIGTERM is what schedulers send before killing a job; SIGUSR1 is the warning SLURM sends ahead of the
    time limit or preemption when a job asks for it (``#SBATCH --signal=USR1@120``). Lightning already
    turns SIGTERM into a stop at the next batch boundary, agreed across DDP ranks; this callback routes
    SIGUSR1 into the same path and writes the checkpoint there, where the weights, optimizer, data position
    and step counters agree, so the resumed run is exact. Under SLURM it then requeues the job
    (``scontrol requeue``) from rank 0. Lightning's own SLURM auto-requeue is switched off by the builders:
    it saves from inside the signal handler, which can land in the middle of an optimizer step.
    """

    def __init__(self, requeue: bool = True) -> None:
        self.requeue = requeue
        self.signal_name = "SIGTERM"
        self.stopped: Preempted | None = None  # set when the run stopped on a signal
        self._previous_usr1: Any = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        connector = trainer._signal_connector

        def on_usr1(signum: int, frame: Any) -> None:
            self.signal_name = "SIGUSR1"
            connector._sigterm_notifier_fn(signum, frame)

        self._previous_usr1 = signal.signal(signal.SIGUSR1, on_usr1)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._restore_handler()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._restore_handler()
        if not isinstance(exception, SIGTERMException):
            return
        checkpoint = _last_checkpoint_path(trainer)
        # A stop during validation keeps the last periodic checkpoint: a half-run validation loop does not
        # restore exactly, and the replay from that checkpoint is deterministic anyway.
        if checkpoint is not None and trainer.training:
            trainer.save_checkpoint(checkpoint)
        if checkpoint is not None and not checkpoint.exists():
            checkpoint = None
        if trainer.is_global_zero:  # said before a requeue, which ends the job at once
            saved = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint saved"
            log.warning("stopping on %s at step %d; %s", self.signal_name, trainer.global_step, saved)
        requeued = self.requeue and trainer.is_global_zero and _requeue_slurm_job()
        # Raising here would cut Lightning's teardown short; the caller reads ``stopped`` instead.
        self.stopped = Preempted(self.signal_name, trainer.global_step, checkpoint, requeued)

    def _restore_handler(self) -> None:
        if self._previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_usr1)
            self._previous_usr1 = None


def _last_checkpoint_path(trainer: Any) -> Path | None:
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath and callback.save_last:
            return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    return None


def _requeue_slurm_job() -> bool:
    """``scontrol requeue`` this SLURM job (array task included); False outside SLURM or on failure."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job_id = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job_id:
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.warning("could not requeue SLURM job %s: %s", job_id, error)
        return False
    if result.returncode != 0:
        log.warning("could not requeue SLURM job %s: %s", job_id, result.stderr.strip())
    return result.returncode == 0
