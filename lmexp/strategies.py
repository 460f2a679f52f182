"""Distributed training: FSDP2 through Lightning, and a rank launcher that is safe under Hydra.

**FSDP.** :class:`FSDP2Strategy` is Lightning's ``ModelParallelStrategy`` with every process in one
data-parallel group (full sharding, no tensor parallelism). The task's ``configure_model`` calls
:func:`configure_model`, which applies ``fully_shard`` (FSDP2) to each transformer block and then to the
whole model, after optional activation checkpointing and per-block ``torch.compile``. It runs over NCCL on
GPUs and over gloo on CPUs (Lightning's ``FSDPStrategy`` refuses CPUs). Checkpoints are either a directory
of per-rank shards (``state_dict=sharded``, torch distributed checkpoint) or one full file written by
rank 0 (``state_dict=full``); :func:`lmexp.checkpoints.load_checkpoint` reads both.

**Launching ranks under Hydra.** For ``devices > 1`` on one machine Lightning starts ranks 1..n-1 by
running the command line of rank 0 again. Under Hydra that re-runs Hydra: with ``-m`` every rank runs its
own copy of the sweep (under Optuna each samples different points), and under the submitit launcher the
command is not even lmexp's. :class:`RankLauncher` instead starts each rank as ``python -m lmexp.train``
with the job's resolved config in the environment (:func:`lmexp.cli.rank_process_environment`): the
rank runs exactly rank 0's job, in rank 0's run dir, without Hydra, writing nothing of its own. After the
job :func:`end_job` waits for the ranks, closes the process group and restores the environment, so the
next job of a multirun starts its ranks afresh. Under SLURM (``srun``) and torchrun every rank is started
by the cluster and nothing is relaunched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import warnings
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from omegaconf import DictConfig
from torch import nn

from lmexp.errors import ConfigError

log = logging.getLogger(__name__)

STATE_DICT_TYPES = ("sharded", "full")
# Variables Lightning sets in rank 0's environment when it starts the other ranks.
_LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


# --------------------------------------------------------------------------------------------- FSDP
class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2 ``fully_shard``) over all processes of all nodes.

    Args:
        activation_checkpointing: recompute each transformer block's activations in the backward pass
            (less memory, about a third more compute).
        state_dict: ``sharded`` (each rank saves its shard; the checkpoint is a directory) or ``full``
            (the full weights are gathered and saved by rank 0 as one file).
        process_group_backend: ``nccl``/``gloo``; None picks NCCL on GPUs and gloo on CPUs.
    """

    def __init__(
        self,
        activation_checkpointing: bool = False,
        state_dict: str = "sharded",
        process_group_backend: str | None = None,
    ) -> None:
        if state_dict not in STATE_DICT_TYPES:
            raise ConfigError(
                f"trainer.strategy.state_dict={state_dict!r} is not one of {', '.join(STATE_DICT_TYPES)}"
            )
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=state_dict == "sharded",
            process_group_backend=process_group_backend,
        )
        self.activation_checkpointing = bool(activation_checkpointing)
        self.state_dict_type = state_dict
        # Lightning writes last.ckpt again at every save; replacing it is what is meant.
        warnings.filterwarnings("ignore", message=r"Detected an existing checkpoint in .*overwriting")

    def setup_environment(self) -> None:
        # Every process is in the one data-parallel (sharding) group; Lightning's "auto" would use one
        # group per node and tensor parallelism inside it.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def process_dataloader(self, dataloader: Any) -> Any:
        # Every forward pass of a sharded model gathers parameters from all ranks, so every rank must run
        # as many evaluation batches as the others, although its shard of the split may be one example
        # shorter (lmexp shards evaluation data without repeating examples, so that metrics are exact).
        from lmexp.data.sampling import ShardSampler

        if isinstance(getattr(dataloader, "sampler", None), ShardSampler):
            return EqualBatches(dataloader, self.world_size)
        return dataloader

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._maybe_padding_step(super().validation_step, *args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._maybe_padding_step(super().test_step, *args, **kwargs)

    def _maybe_padding_step(self, step: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        if not (isinstance(batch, dict) and batch.get(PADDING_KEY)):
            return step(batch, *args, **kwargs)
        # A padding batch: run the step (its forward takes part in the parameter gathering), then put
        # every metric back as it was, so the batch counts for nothing.
        batch = {key: value for key, value in batch.items() if key != PADDING_KEY}
        with unchanged_metrics(self.lightning_module):
            step(batch, *args, **kwargs)
        return None


PADDING_KEY = "lmexp_padding"


class EqualBatches:
    """An evaluation loader that ends with padding batches up to rank 0's (the longest) batch count.

    A padding batch is the split's first example, marked with :data:`PADDING_KEY`; the strategy runs it
    and then restores the metrics, so it takes part in the collectives and counts for nothing.
    """

    def __init__(self, dataloader: Any, world_size: int) -> None:
        self.dataloader = dataloader
        per_rank = -(-len(dataloader.dataset) // world_size)  # rank 0's shard is the longest
        self.n_batches = -(-per_rank // dataloader.batch_size)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Any:
        emitted = 0
        for batch in self.dataloader:
            emitted += 1
            yield batch
        if emitted < self.n_batches:
            from torch.utils.data import DataLoader

            one = DataLoader(self.dataloader.dataset, batch_size=1, collate_fn=self.dataloader.collate_fn)
            padding = {**next(iter(one)), PADDING_KEY: True}
            for _ in range(self.n_batches - emitted):
                yield padding


@contextlib.contextmanager
def unchanged_metrics(module: nn.Module) -> Any:
    """Restore the state of every torchmetrics metric of ``module`` on exit."""
    from torchmetrics import Metric

    saved = [
        (metric, metric._copy_state_dict(), metric._update_count, metric._computed)
        for metric in module.modules()
        if isinstance(metric, Metric)
    ]
    try:
        yield
    finally:
        for metric, state, update_count, computed in saved:
            for name, value in state.items():
                setattr(metric, name, value)
            metric._update_count, metric._computed = update_count, computed


def strategy_problems(node: Any) -> list[str]:
    """Problems with ``trainer.strategy`` settings lmexp defines, found before any data work."""
    if not isinstance(node, DictConfig) or node.get("_target_") != f"{__name__}.{FSDP2Strategy.__name__}":
        return []
    problems = []
    state_dict = node.get("state_dict", "sharded")
    if state_dict not in STATE_DICT_TYPES:
        allowed = ", ".join(STATE_DICT_TYPES)
        problems.append(f"trainer.strategy.state_dict={state_dict!r} is not one of {allowed}")
    checkpointing = node.get("activation_checkpointing", False)
    if not isinstance(checkpointing, bool):
        problems.append(
            f"trainer.strategy.activation_checkpointing={checkpointing!r}: expected true or false"
        )
    return problems


def configure_model(task: Any) -> None:
    """Shard (under :class:`FSDP2Strategy`) and/or compile ``task.model``; called once per process.

    Compilation is in place (``nn.Module.compile``), so parameter names, and with them checkpoints, are
    the same with and without it. Activation checkpointing uses the composable ``checkpoint``, which
    also keeps the names.
    """
    if getattr(task, "_model_configured", False):
        return
    strategy = task._trainer.strategy if task._trainer is not None else None
    if isinstance(strategy, FSDP2Strategy):
        shard_model(
            task.model,
            strategy.device_mesh["data_parallel"],
            activation_checkpointing=strategy.activation_checkpointing,
            compile_blocks=task.compile_model,
            param_dtype=torch.bfloat16 if strategy.precision_plugin.precision == "bf16-mixed" else None,
        )
    elif task.compile_model:
        task.model.compile()
    task._model_configured = True


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks (``lmexp.models.layers.Block``), in order."""
    from lmexp.models.layers import Block

    return [module for module in model.modules() if isinstance(module, Block)]


def shard_model(
    model: nn.Module,
    mesh: Any,
    activation_checkpointing: bool = False,
    compile_blocks: bool = False,
    param_dtype: torch.dtype | None = None,
) -> None:
    """``fully_shard`` each transformer block, then the rest of the model (embeddings, head) as the root.

    With ``param_dtype`` (bf16-mixed) parameters are gathered and used in that dtype while gradients are
    reduced and the optimizer steps in fp32, as FSDP2's ``MixedPrecisionPolicy`` does.
    """
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in transformer_blocks(model):
        if activation_checkpointing:
            checkpoint(block)
        if compile_blocks:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


# ----------------------------------------------------------------------------------- rank launching
class RankLauncher(_SubprocessScriptLauncher):
    """Starts ranks 1..n-1 of this machine as ``python -m lmexp.train`` processes running ``job_config``."""

    def __init__(self, launcher: _SubprocessScriptLauncher, job_config: DictConfig) -> None:
        super().__init__(launcher.cluster_environment, launcher.num_processes, launcher.num_nodes)
        self.job_config = job_config
        self._saved_environment = {name: os.environ.get(name) for name in _LAUNCH_VARIABLES}

    def _call_children_scripts(self) -> None:
        from lmexp.cli import rank_process_command, rank_process_environment

        self._check_can_spawn_children()
        self.procs = []
        environment = self.cluster_environment
        # Rank 0 keeps these for the whole job (fit, validate and test each call launch(); their presence
        # tells Lightning that the ranks exist already); end_job() puts the old values back.
        os.environ["MASTER_ADDR"] = environment.main_address
        os.environ["MASTER_PORT"] = str(environment.main_port)
        os.environ["NODE_RANK"] = str(environment.node_rank())
        os.environ["LOCAL_RANK"] = str(environment.local_rank())
        os.environ["WORLD_SIZE"] = str(self.num_processes * self.num_nodes)
        for local_rank in range(1, self.num_processes):
            env = rank_process_environment(self.job_config)
            env["LOCAL_RANK"] = str(local_rank)
            self.procs.append(subprocess.Popen(rank_process_command(), env=env, cwd=os.getcwd()))

    def end_job(self, failed: bool = False, timeout: float = 120.0) -> None:
        """Wait for the ranks this launcher started (stop them if the job failed); restore the environment."""
        for proc in self.procs:
            if failed and proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("rank process %d did not exit; killing it", proc.pid)
                proc.kill()
        for name, value in self._saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def use_rank_launcher(trainer: Any, cfg: DictConfig) -> None:
    """Make ``trainer`` start its ranks with :class:`RankLauncher` (when it starts any at all)."""
    strategy = trainer.strategy
    launcher = getattr(strategy, "_launcher", None)
    if type(launcher) is _SubprocessScriptLauncher:
        strategy._launcher = RankLauncher(launcher, cfg)


def end_job(trainer: Any | None, failed: bool = False) -> None:
    """Close this job's distributed state, so that the next job in this process can start its own."""
    launcher = getattr(getattr(trainer, "strategy", None), "_launcher", None)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if isinstance(launcher, RankLauncher):
        launcher.end_job(failed=failed)
