"""Guards of a run's state: a stop at the first non-finite loss, and a clean stop on preemption signals.

Both are Lightning callbacks that ``lmexp.training.build`` adds to every run; neither needs configuring
beyond ``trainer.skip_nonfinite``. Checkpoint files themselves are written atomically
(lmexp/training/checkpoints.py).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lmexp.errors import Preempted, UserError
from lmexp.training.checkpoints import last_checkpoint_path
from lmexp.training.compat import logs_this_step

log = logging.getLogger(__name__)


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
        checkpoint = last_checkpoint_path(trainer)
        kept = f"; the last good checkpoint is {checkpoint}" if checkpoint and checkpoint.exists() else ""
        raise NonFiniteLossError(
            f"training loss is {value} at step {int(step)} (epoch {int(epoch)}){kept}; lower optim.lr, or "
            "set trainer.skip_nonfinite=true to skip such batches"
        )

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if logs_this_step(trainer):  # a logging interval: reading values is due anyway
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
    SIGUSR1 into the same path (it sends the process a SIGTERM) and writes the checkpoint there, where the
    weights, optimizer, data position and step counters agree, so the resumed run is exact. Under SLURM it
    then requeues the job (``scontrol requeue``) from rank 0. Lightning's own SLURM auto-requeue is switched
    off by the builders: it saves from inside the signal handler, which can land in the middle of an
    optimizer step.
    """

    def __init__(self, requeue: bool = True) -> None:
        self.requeue = requeue
        self.signal_name = "SIGTERM"
        self.stopped: Preempted | None = None  # set when the run stopped on a signal
        self._previous_usr1: Any = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        def on_usr1(signum: int, frame: Any) -> None:
            self.signal_name = "SIGUSR1"
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's own SIGTERM handling takes it from here

        self._previous_usr1 = signal.signal(signal.SIGUSR1, on_usr1)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._restore_handler()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._restore_handler()
        if not isinstance(exception, SIGTERMException):
            return
        checkpoint = last_checkpoint_path(trainer)
        # A stop during validation keeps the last periodic checkpoint: a half-run validation loop does not
        # restore exactly, and the replay from that checkpoint is deterministic anyway.
        if checkpoint is not None and trainer.training:
            trainer.save_checkpoint(checkpoint, weights_only=False)
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
