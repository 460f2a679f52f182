"""Every private name of Lightning (and torch) that lmexp relies on, in one place.

Everywhere else lmexp uses public APIs. What is here has no public equivalent in Lightning 2.6; each entry
says what it is for and why no public API does the job, and ``tests/training/test_compat.py`` checks every one
of them against the installed version, so an upgrade that moves a name fails one test with a message naming
it, instead of a training run failing somewhere else. When upgrading Lightning, run that test first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher


# --------------------------------------------------------------------------------------- logging steps
def logs_this_step(trainer: Any) -> bool:
    """Whether Lightning sends this training step's logged values to the loggers.

    lmexp computes its train metrics only on those steps (computing them syncs the device). Lightning's own
    test (``_LoggerConnector.should_update_logs``) counts batches that stepped the optimizer, which the
    public ``global_step`` does not equal under manual optimization or before a step finishes; no public
    property exposes it.
    """
    return bool(trainer._logger_connector.should_update_logs)


def pending_log_row(trainer: Any) -> dict[str, Any]:
    """The values Lightning will log at the end of this training step, as it will log them.

    A checkpoint written in this step's hooks keeps them (lmexp.training.resume). ``trainer.logged_metrics``
    holds the previous row, ``callback_metrics`` also the validation values; only the logger connector's
    current "log" collection is the row about to be written.
    """
    return dict(trainer._logger_connector.metrics["log"])


def batches_that_stepped(trainer: Any) -> int:
    """The step index Lightning writes next to logged rows (``step`` in metrics.csv): batches that stepped
    the optimizer, saved in checkpoints by the fit loop. Not a public attribute."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def is_accumulating(trainer: Any) -> bool:
    """Whether this training batch only accumulates gradients (no optimizer step after it). Lightning's
    rule also covers the final batch of an epoch and strategies that accumulate themselves."""
    return bool(trainer.fit_loop._should_accumulate())


def validates_after_this_batch(trainer: Any) -> bool:
    """Whether the fit loop runs validation right after this training batch (asked in ``on_train_batch_end``).

    A checkpoint written in ``on_train_batch_end`` of such a batch resumes with that validation skipped
    (Lightning fast-forwards the validation counters of a run restarted there), so lmexp writes it after the
    validation instead (lmexp.training.checkpoints). The fit loop's own rule (``_should_check_val_fx``: step
    or epoch intervals, time intervals, the last batch, early stops) is private; its inputs do not change
    between ``on_train_batch_end`` and the check.
    """
    loop = trainer.fit_loop
    return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))


# ---------------------------------------------------------------------------------------- rank launching
class ChildScriptLauncher(_SubprocessScriptLauncher):
    """Lightning's launcher for ranks 1..n-1 of one machine, with lmexp's own command for them.

    Lightning re-runs rank 0's command line (``sys.argv``) for the other ranks, which under Hydra re-runs
    Hydra (a sweep per rank, a second output dir). There is no public hook for the command; the launcher
    class and its ``_call_children_scripts`` are private, so lmexp's override lives here.
    ``start_rank(local_rank) -> Popen`` starts one rank.
    """

    def __init__(self, launcher: _SubprocessScriptLauncher, start_rank: Callable[[int], Any]) -> None:
        super().__init__(launcher.cluster_environment, launcher.num_processes, launcher.num_nodes)
        self.start_rank = start_rank

    def _call_children_scripts(self) -> None:
        self._check_can_spawn_children()
        environment = self.cluster_environment
        # As Lightning does: rank 0 keeps these for the whole job (fit, validate and test each call launch();
        # their presence tells Lightning that the ranks exist already).
        os.environ["MASTER_ADDR"] = environment.main_address
        os.environ["MASTER_PORT"] = str(environment.main_port)
        os.environ["NODE_RANK"] = str(environment.node_rank())
        os.environ["LOCAL_RANK"] = str(environment.local_rank())
        os.environ["WORLD_SIZE"] = str(self.num_processes * self.num_nodes)
        self.procs = [self.start_rank(local_rank) for local_rank in range(1, self.num_processes)]


def replace_child_launcher(strategy: Any, start_rank: Callable[[int], Any]) -> bool:
    """Make ``strategy`` start its child ranks with :class:`ChildScriptLauncher`; False when it starts none
    this way (one process, spawn, or ranks started by the cluster). ``strategy.launcher`` is read-only."""
    if type(strategy._launcher) is not _SubprocessScriptLauncher:
        return False
    strategy._launcher = ChildScriptLauncher(strategy._launcher, start_rank)
    return True


def child_launcher(strategy: Any) -> ChildScriptLauncher | None:
    """The :class:`ChildScriptLauncher` of ``strategy``, if it has one."""
    launcher = getattr(strategy, "launcher", None)
    return launcher if isinstance(launcher, ChildScriptLauncher) else None


# ------------------------------------------------------------------------------------------------- FSDP
def use_one_sharding_group(strategy: Any) -> None:
    """Put every process of every node in ``ModelParallelStrategy``'s data-parallel (sharding) group.

    Its ``data_parallel_size="auto"`` means one group per node with tensor parallelism inside; the size is
    known only once the strategy knows the devices, and is kept in a private attribute.
    """
    strategy._data_parallel_size = strategy.num_nodes * strategy.num_processes


def composable_activation_checkpointing() -> Callable[[Any], Any]:
    """torch's composable activation checkpointing, which, unlike ``checkpoint_wrapper``, keeps parameter
    names (and so checkpoints) unchanged; torch exports it from a private module only."""
    from torch.distributed._composable import checkpoint

    return checkpoint


# ------------------------------------------------------------------------------------------------- W&B
def drop_wandb_init_argument(logger: Any, name: str) -> None:
    """Remove an argument Lightning always passes to ``wandb.init`` (``anonymous=None``, which wandb 0.31
    answers with a deprecation warning on every run's console). The init arguments are private."""
    if name in logger._wandb_init and logger._wandb_init[name] is None:
        del logger._wandb_init[name]


def restart_wandb_run(logger: Any, new_run: bool) -> None:
    """Forget the logger's W&B run so that ``logger.experiment`` opens it again (``new_run``: a fresh run,
    not the id it was given). For a resumed job whose killed predecessor still holds its run; the logger has
    no public way to retry ``wandb.init``."""
    logger._experiment = None
    if new_run:
        logger._wandb_init["id"], logger._id = None, None


# ------------------------------------------------------------------------------------------ progress bar
class RunProgressBar(RichProgressBar):
    """Lightning's rich progress bar without a bogus epoch bound on step-bounded runs.

    Lightning titles the training bar ``Epoch {epoch}/{max_epochs - 1}``; a run bounded by
    ``trainer.max_steps`` has ``max_epochs=-1``, which showed as ``Epoch 16/-2``. This bar says
    ``Epoch 16`` then. The title comes from the private ``_get_train_description``; no public hook sets it.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 1:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        return f"{description:{len(self.validation_description)}}"  # as Lightning pads it, against flicker
