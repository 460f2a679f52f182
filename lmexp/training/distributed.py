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
command is not even lmexp's. :func:`use_rank_launcher` instead starts each rank as ``python -m lmexp.train``
with the job's resolved config in the environment (:func:`lmexp.cli.rank_process_environment`): the
rank runs exactly rank 0's job, in rank 0's run dir, without Hydra, writing nothing of its own. After the
job :func:`end_job` waits for the ranks, closes the process group and restores the environment, so the
next job of a multirun starts its ranks afresh. Under SLURM (``srun``) and torchrun every rank is started
by the cluster and nothing is relaunched.
"""

from __future__ import annotations

import logging
import os
import subprocess
import warnings
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import DictConfig
from torch import nn

from lmexp.training import compat

log = logging.getLogger(__name__)

PADDING_KEY = (
    "lmexp_padding"  # marks an evaluation batch that only keeps FSDP ranks in step (Task.is_padding)
)
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
        state_dict: Literal["sharded", "full"] = "sharded",
        process_group_backend: str | None = None,
    ) -> None:
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
        compat.use_one_sharding_group(self)
        super().setup_environment()

    def process_dataloader(self, dataloader: Any) -> Any:
        # Every forward pass of a sharded model gathers parameters from all ranks, so every rank must run
        # as many evaluation batches as the others, although its shard of the split may be one example
        # shorter (lmexp shards evaluation data without repeating examples, so that metrics are exact).
        from lmexp.data.sampling import EvaluationBatches, ShardSampler

        if isinstance(getattr(dataloader, "sampler", None), ShardSampler):
            per_rank = -(-len(dataloader.dataset) // self.world_size)  # rank 0's shard is the longest
            return EqualBatches(dataloader, -(-per_rank // dataloader.batch_size))
        batches = getattr(dataloader, "batch_sampler", None)
        if isinstance(batches, EvaluationBatches):  # language-model data: batches of one source each
            return EqualBatches(dataloader, batches.most_batches)
        return dataloader


class EqualBatches:
    """An evaluation loader that ends with padding batches up to rank 0's (the longest) batch count.

    A padding batch is the split's first example, marked with ``PADDING_KEY``: the task runs its forward
    pass (which takes part in the parameter gathering) and counts nothing of it (``Task.is_padding``).
    """

    def __init__(self, dataloader: Any, n_batches: int) -> None:
        self.dataloader = dataloader
        self.n_batches = n_batches  # rank 0's batch count

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


def configure_model(task: Any) -> None:
    """Shard (under :class:`FSDP2Strategy`) and/or compile ``task.model``; called once per process.

    Compilation is in place (``nn.Module.compile``), so parameter names, and with them checkpoints, are
    the same with and without it. Activation checkpointing uses the composable ``checkpoint``, which
    also keeps the names.
    """
    if getattr(task, "_model_configured", False):
        return
    strategy = task.trainer.strategy
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


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The sub-modules of ``model`` that FSDP shards one by one: its backbone's ``shard_units()`` (the
    transformer blocks; a fine-tuning head wraps the backbone as ``model.backbone``)."""
    backbone = getattr(model, "backbone", model)
    return list(backbone.shard_units()) if hasattr(backbone, "shard_units") else []


def shard_model(
    model: nn.Module,
    mesh: Any,
    activation_checkpointing: bool = False,
    compile_blocks: bool = False,
    param_dtype: torch.dtype | None = None,
) -> None:
    """``fully_shard`` each shard unit, then the rest of the model (embeddings, head) as the root.

    With ``param_dtype`` (bf16-mixed) parameters are gathered and used in that dtype while gradients are
    reduced and the optimizer steps in fp32, as FSDP2's ``MixedPrecisionPolicy`` does.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    checkpoint = compat.composable_activation_checkpointing()
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in shard_units(model):
        if activation_checkpointing:
            checkpoint(block)
        if compile_blocks:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


# ----------------------------------------------------------------------------------- rank launching
def use_rank_launcher(trainer: Any, cfg: DictConfig) -> None:
    """Make ``trainer`` start ranks 1..n-1 of this machine as ``python -m lmexp.train`` processes running
    ``cfg`` (when it starts any at all), instead of re-running rank 0's command line."""
    from lmexp.cli import rank_process_command, rank_process_environment

    saved = {name: os.environ.get(name) for name in _LAUNCH_VARIABLES}

    def start_rank(local_rank: int) -> subprocess.Popen:
        env = rank_process_environment(cfg)
        env["LOCAL_RANK"] = str(local_rank)
        return subprocess.Popen(rank_process_command(), env=env, cwd=os.getcwd())

    if compat.replace_child_launcher(trainer.strategy, start_rank):
        trainer.strategy.saved_launch_environment = saved


def end_job(trainer: Any | None, failed: bool = False, timeout: float = 120.0) -> None:
    """Close this job's distributed state, so that the next job in this process can start its own: wait for
    the ranks it started (stop them if the job failed) and restore the environment."""
    strategy = getattr(trainer, "strategy", None)
    launcher = compat.child_launcher(strategy) if strategy is not None else None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if launcher is None:
        return
    for proc in launcher.procs:
        if failed and proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("rank process %d did not exit; killing it", proc.pid)
            proc.kill()
    for name, value in getattr(strategy, "saved_launch_environment", {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
