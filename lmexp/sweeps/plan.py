"""``python -m lmexp.plan -m <overrides>``: check every point of a sweep before anything runs.

Takes the same overrides as ``python -m lmexp.train -m`` (``+sweep=<name>``, ``a=1,2``, ...), composes
every point, validates it as a run would (``lmexp.config.settings.load_settings``), builds its model on the
meta device (no memory, no data) and prints one row per point: parameters, training FLOPs per token, tokens
per optimizer step and an estimate of the memory per device. Exits with status 2 and one ``error:`` line
naming every bad point, so a sweep is fixed before it is submitted.

Optuna searches (``interval(...)`` parameters) have no fixed points: the plan checks the corners of the
search space (both ends of every interval, every choice).

Memory per device (an estimate, for AdamW-like optimizers):

* parameters, gradients and optimizer state in the bytes of the precision (``*-mixed`` keeps fp32
  weights, gradients and state; ``*-true`` everything in that dtype), divided by the number of devices
  when the strategy shards them (FSDP);
* activations of a micro-batch: per transformer layer and token ``34 h + 5 a T`` bytes at 16 bits
  (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", no
  recomputation; scaled for 32-bit activations; only the layer inputs with activation checkpointing),
  plus the fp32 logits and their gradient.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, open_dict

from lmexp.config import overrides as override_strings
from lmexp.errors import ConfigError, UserError

GIB = 1024**3


@dataclass
class PointPlan:
    """What one point of the sweep would be."""

    num: int
    overrides: list[str]
    problems: list[str] = field(default_factory=list)
    parameters: int = 0
    flops_per_token: int = 0
    tokens_per_step: int = 0
    devices: int = 1
    memory: dict[str, float] = field(default_factory=dict)  # bytes per device, by part

    @property
    def ok(self) -> bool:
        return not self.problems


# ------------------------------------------------------------------------------------- the points
def _split_args(argv: list[str]) -> list[str]:
    return [a for a in argv if a not in ("-m", "--multirun")]


def _compose(overrides: list[str], run_dir: str) -> DictConfig:
    """Compose conf/train.yaml as a job of the sweep would see it (Hydra's resolvers included)."""
    from lmexp.config.compose import compose_job

    return compose_job(overrides, run_dir, keep_hydra=True)


def sweep_points(args: list[str]) -> tuple[list[list[str]], DictConfig]:
    """The overrides of every point ``python -m lmexp.train -m <args>`` would run, and the base config."""
    base = _compose(override_strings.fixed_only(args), "plan")
    params = dict(base.hydra.sweeper.get("params") or {})
    # As the sweepers do: the sweep config's params first, then the command line.
    return override_strings.expand_sweep(args, params), base


# ---------------------------------------------------------------------------------------- estimates
def _shards_states(trainer: Any) -> bool:
    return any(word in trainer.strategy_name.lower() for word in ("fsdp", "deepspeed", "modelparallel"))


def _activation_checkpointing(trainer: Any) -> bool:
    return isinstance(trainer.strategy, dict) and bool(trainer.strategy.get("activation_checkpointing"))


def activation_bytes(model_config: Any, settings: Any, act_bytes: int) -> float:
    """Activations kept for backward by one micro-batch on one device (see the module docstring)."""
    batch, seq = settings.data.batch_size, settings.data.block_size
    layers, vocab = int(model_config.n_layer), int(model_config.vocab_size)
    width = model_config.hidden_width
    if hasattr(model_config, "n_head"):
        per_layer_token = (34 * width + 5 * model_config.n_head * seq) * act_bytes / 2
    else:  # recurrent: gates, cell and hidden states, and the layer input
        per_layer_token = 10 * width * act_bytes
    if _activation_checkpointing(settings.trainer):
        per_layer_token = width * act_bytes  # the block inputs; one block is recomputed at a time
    logits = batch * seq * vocab * 4 * 2  # fp32 logits for the loss, and their gradient
    return batch * seq * layers * per_layer_token + logits


_OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1}  # state tensors per parameter (sgd: momentum)


def estimate(point: PointPlan, settings: Any) -> None:
    """Fill in the parameters, FLOPs, tokens per step and memory of a valid point."""
    import torch

    from lmexp.training.build import sized_model_config
    from lmexp.training.perf import flops_per_token
    from lmexp.training.precision import precision_of

    model_config = settings.model
    if model_config.vocab_size is None:  # the tokenizer's size decides
        model_config = sized_model_config(model_config, settings.tokenizer.vocab_size)
    with torch.device("meta"):
        model = model_config.build()
    point.parameters = sum(p.numel() for p in model.parameters())
    point.flops_per_token = flops_per_token(model_config, settings.data.block_size, model=model)
    trainer = settings.trainer
    point.devices = trainer.device_count or 1
    tokens = settings.data.batch_size * settings.data.block_size
    point.tokens_per_step = tokens * trainer.accumulate_grad_batches * point.devices
    precision = precision_of(trainer.precision)
    shards = point.devices if _shards_states(trainer) else 1
    optim = settings.optim
    states = 0 if optim.name == "sgd" and not optim.momentum else _OPTIMIZER_STATES[optim.name]
    point.memory = {
        "params": point.parameters * precision.weight_bytes / shards,
        "grads": point.parameters * precision.grad_bytes / shards,
        "optimizer": point.parameters * precision.state_bytes * states / shards,
        "activations": activation_bytes(model_config, settings, precision.activation_bytes),
    }
    point.memory["total"] = sum(point.memory.values())


# ------------------------------------------------------------------------------------------- checks
def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _launcher_problems(cfg: DictConfig) -> list[str]:
    launcher = str(cfg.hydra.launcher.get("_target_", ""))
    devices = cfg.trainer.get("devices")
    if launcher.endswith("SlurmLauncher") and not (isinstance(devices, int) and devices > 0):
        return [
            f"trainer.devices={devices}: hydra/launcher=slurm needs a number of devices per node "
            "(tasks_per_node follows it)"
        ]
    return []


def plan_point(num: int, overrides: list[str], sweep_dir: str) -> PointPlan:
    """Compose, check and estimate one point; problems are collected, never raised."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from lmexp.config.settings import load_settings

    point = PointPlan(num=num, overrides=overrides)
    try:
        cfg = _compose(overrides, f"{sweep_dir}/{num}")
        point.problems += _launcher_problems(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        estimate(point, load_settings(cfg))
    except ConfigError as error:
        point.problems += error.problems
    except (UserError, HydraException, OmegaConfBaseException, ValueError, TypeError) as error:
        point.problems.append(_one_line(error))
    return point


def _size(value: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def _count(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def swept_only(points: list[PointPlan]) -> list[str]:
    """The override keys that differ between points."""
    from lmexp.sweeps.point import swept_keys

    return swept_keys([{"overrides": p.overrides} for p in points])


def print_plan(points: list[PointPlan], base: DictConfig) -> None:
    """The table: one row per point."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from lmexp.sweeps.point import override_values

    keys = swept_only(points)
    strategy = base.trainer.get("strategy") or "auto"
    strategy = strategy if isinstance(strategy, str) else str(strategy.get("_target_", "")).rsplit(".", 1)[-1]
    precision = base.trainer.get("precision")
    table = Table(
        title=f"lmexp sweep plan: {len(points)} points (precision {precision}, strategy {strategy})",
        title_justify="left",
    )
    columns = [
        "#",
        *keys,
        "params",
        "FLOPs/token",
        "tokens/step",
        "weights",
        "grads",
        "optimizer",
        "activations",
        "memory/device",
        "check",
    ]
    for column in columns:
        table.add_column(column, overflow="fold", justify="left" if column in (*keys, "check") else "right")
    for point in points:
        values = override_values({"overrides": point.overrides})
        cells = [str(point.num), *(values.get(k, "") for k in keys)]
        if point.ok:
            m = point.memory
            cells += [
                _count(point.parameters),
                _count(point.flops_per_token),
                f"{point.tokens_per_step:,}",
                _size(m["params"]),
                _size(m["grads"]),
                _size(m["optimizer"]),
                _size(m["activations"]),
                _size(m["total"]),
                "ok",
            ]
        else:
            cells += [""] * 8 + ["bad (below)"]
        table.add_row(*(Text(c) for c in cells), style=None if point.ok else "red")
    console = Console(width=max(160, Console().width), highlight=False)
    console.print(table)
    for point in points:
        if not point.ok:
            console.print(Text(f"point {point.num}: {'; '.join(point.problems)}", style="red"))
    console.print(
        "memory/device: an estimate (weights, gradients, optimizer state, activations of one micro-batch)"
    )


def plan(args: list[str]) -> list[PointPlan]:
    """Plan ``python -m lmexp.train -m <args>``; print the table; raise ConfigError naming the bad points."""
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    from lmexp.config.compose import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        try:
            overrides, base = sweep_points(_split_args(args))
        except HydraException as error:
            raise ConfigError(_one_line(error)) from None
        sweep_dir = str(base.hydra.sweep.dir)
        points = [plan_point(num, point, sweep_dir) for num, point in enumerate(overrides)]
    print_plan(points, base)
    bad = [p for p in points if not p.ok]
    if bad:
        keys = swept_only(points)
        names = {p.num: " ".join(o for o in p.overrides if override_strings.key_of(o) in keys) for p in bad}
        raise ConfigError(
            [f"{len(bad)} of {len(points)} points are bad"]
            + [f"point {p.num} ({names[p.num]}): {', '.join(p.problems)}" for p in bad]
        )
    print(f"plan: all {len(points)} points are valid; nothing was trained or submitted")
    return points


def main(argv: list[str] | None = None) -> int:
    """``python -m lmexp.plan``: 0 when every point is valid; a ConfigError naming the bad ones otherwise."""
    args = _split_args(list(sys.argv[1:] if argv is None else argv))
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    plan(args)
    return 0
