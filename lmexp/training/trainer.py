"""``conf/trainer/*.yaml``: the Lightning ``Trainer`` of a run, its settings checked before any data work."""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from lmexp.config.schema import Schema, at_least, listed, positive, signature_problems
from lmexp.training.precision import PrecisionName


@dataclass
class TrainerConfig(Schema):
    """The Trainer's settings. Keys that are not fields below but are arguments of Lightning's ``Trainer``
    (``+trainer.limit_train_batches=10``) are passed through as they are."""

    group: ClassVar[str] = "trainer"

    accelerator: str = "cpu"
    """``cpu``, ``gpu`` (CUDA), ``mps`` or ``auto``."""
    devices: int | str | list[int] = 1
    """Devices per node: a count, ``auto`` (all visible GPUs) or a list of device indices."""
    num_nodes: int = positive(1)
    """Nodes (machines); under SLURM one task per device on each."""
    precision: PrecisionName = "32-true"
    """``32-true``, ``bf16-mixed``, ``16-mixed`` (fp16 autocast + gradient scaler), ``bf16-true``, ..."""
    max_steps: int = at_least(300, -1)
    """Optimizer steps to train for (-1: until ``max_epochs``)."""
    max_epochs: int | None = None
    """Epochs to train for (null: ``max_steps`` decides)."""
    val_check_interval: int | float = positive(100)
    """Validate every N training steps (an int), or at this fraction of an epoch (a float <= 1)."""
    check_val_every_n_epoch: int | None = None
    """Validate every N epochs; null counts ``val_check_interval`` in steps across epochs."""
    limit_val_batches: int | float = at_least(1.0, 0)
    """Validation batches per evaluation: a count (int) or a fraction of the split (float)."""
    num_sanity_val_steps: int = at_least(0, -1)
    """Validation batches run before training as a check (0 = none)."""
    log_every_n_steps: int = at_least(10, 0)
    """Steps per logged training row (train metrics are averaged over the window)."""
    gradient_clip_val: float | None = at_least(1.0, 0)
    """Clip the gradient norm to this (null: no clipping)."""
    accumulate_grad_batches: int = positive(1)
    """Micro-batches per optimizer step (the global batch grows with it)."""
    deterministic: bool | str = False
    """Deterministic algorithms (``true``, ``warn``); slower."""
    benchmark: bool = False
    """cuDNN autotuning."""
    use_distributed_sampler: bool = False
    """Keep false: lmexp's samplers shard the data by rank themselves."""
    enable_model_summary: bool = True
    """Print the model summary at the start."""
    skip_nonfinite: bool = False
    """lmexp: skip a batch whose loss is NaN/inf (counted) instead of stopping the run naming the step."""
    strategy: Any = "auto"
    """``auto``, ``ddp``, or a node with ``_target_`` (DDPStrategy, FSDP2Strategy) and its arguments."""
    extra: dict[str, Any] = listed(dict)
    """Other ``Trainer`` arguments, passed through as they are."""

    @classmethod
    def passes_through(cls, name: str) -> bool:
        return name in _trainer_arguments()

    def problems(self) -> list[str]:
        problems = self._name_problems()
        if self.max_steps == 0:
            problems.append("trainer.max_steps=0: expected a positive integer (or -1)")
        if isinstance(self.strategy, dict) and "_target_" in self.strategy:
            problems += signature_problems(self.strategy["_target_"], self.strategy, "trainer.strategy")
        elif not isinstance(self.strategy, str):
            problems.append(f"trainer.strategy={self.strategy!r}: expected a name or a node with _target_")
        return problems

    def _name_problems(self) -> list[str]:
        """Strings Lightning would refuse only when the Trainer is built, after the data work."""
        from lightning.pytorch.accelerators import AcceleratorRegistry

        problems = []
        accelerators = sorted({"auto", "gpu", *AcceleratorRegistry.available_accelerators()})
        if isinstance(self.accelerator, str) and self.accelerator not in accelerators:
            problems.append(
                f"trainer.accelerator={self.accelerator!r} is not one of {', '.join(accelerators)}"
            )
        if isinstance(self.devices, str) and not re.fullmatch(r"auto|-1|\d+|\d+(,\s*\d+)*,?", self.devices):
            problems.append(
                f"trainer.devices={self.devices!r}: expected a count, auto, -1 or device indices like 0,1"
            )
        if isinstance(self.deterministic, str) and self.deterministic != "warn":
            problems.append(f"trainer.deterministic={self.deterministic!r}: expected true, false or warn")
        return problems

    @property
    def device_count(self) -> int | None:
        """Devices over all nodes, or None when only the machine knows (``auto``)."""
        if isinstance(self.devices, int) and self.devices > 0:
            return self.devices * self.num_nodes
        if isinstance(self.devices, list):
            return len(self.devices) * self.num_nodes
        return None

    @property
    def strategy_name(self) -> str:
        """The strategy's name or class name (``auto``, ``DDPStrategy``, ``FSDP2Strategy``)."""
        if isinstance(self.strategy, dict):
            return str(self.strategy.get("_target_", "")).rsplit(".", 1)[-1]
        return str(self.strategy)

    def build(self, **kwargs: Any) -> Any:
        """The Lightning ``Trainer`` (``kwargs``: loggers, callbacks, plugins, default_root_dir, ...)."""
        import hydra.utils
        import lightning.pytorch as pl

        settings = self.to_dict()
        extra = settings.pop("extra")
        settings.pop("skip_nonfinite")
        strategy = settings.pop("strategy")
        if isinstance(strategy, dict):
            strategy = hydra.utils.instantiate(strategy, _convert_="all")
        return pl.Trainer(**settings, **extra, strategy=strategy, **kwargs)


@functools.cache
def _trainer_arguments() -> frozenset[str]:
    import lightning.pytorch as pl

    return frozenset(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
