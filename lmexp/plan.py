"""``python -m lmexp.plan -m <overrides>``: check every point of a sweep before anything runs.

Takes the same overrides as ``python -m lmexp.train -m`` (``+sweep=<name>``, ``a=1,2``, ...), composes
every point, validates it as a run would (``lmexp.builders.check_config``), builds its model on the meta
device (no memory, no data) and prints one row per point: parameters, training FLOPs per token, tokens
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

import itertools
import sys
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from lmexp.errors import ConfigError, UserError

GIB = 1024**3
# bytes per element: (weights, gradients, one optimizer state, activations)
PRECISION_BYTES = {
    "64-true": (8, 8, 8, 8),
    "64": (8, 8, 8, 8),
    "32-true": (4, 4, 4, 4),
    "32": (4, 4, 4, 4),
    "16-mixed": (4, 4, 4, 2),
    "16": (4, 4, 4, 2),
    "bf16-mixed": (4, 4, 4, 2),
    "bf16": (4, 4, 4, 2),
    "16-true": (2, 2, 2, 2),
    "bf16-true": (2, 2, 2, 2),
}


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


def _interval_ends(override: Any) -> list[str]:
    sweep = override.value()
    ends = [sweep.start, sweep.end]
    if all(float(e).is_integer() for e in ends) and not any(isinstance(e, float) for e in ends):
        ends = [int(e) for e in ends]
    return [str(e) for e in ends]


def expand_points(overrides: list[Any]) -> list[list[str]]:
    """Every combination of the sweep overrides, as Hydra's basic sweeper forms them (a later override of
    a key replaces an earlier one in its place); interval sweeps contribute their two ends."""
    axes: dict[str, list[str]] = {}
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            axes[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            axes[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            axes[key] = [f"{key}={value}" for value in _interval_ends(override)]
    return [list(combination) for combination in itertools.product(*axes.values())]


def _compose(overrides: list[str], run_dir: str) -> DictConfig:
    """Compose conf/train.yaml as a job of the sweep would see it (Hydra's resolvers included)."""
    from lmexp.cli import compose_job

    return compose_job(overrides, run_dir, keep_hydra=True)


def sweep_points(args: list[str]) -> tuple[list[list[str]], DictConfig]:
    """The overrides of every point ``python -m lmexp.train -m <args>`` would run, and the base config."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(args)
    fixed = [a for a, o in zip(args, parsed, strict=True) if not o.is_sweep_override()]
    base = _compose(fixed, "plan")
    params = base.hydra.sweeper.get("params") or {}
    # As the sweepers do: the sweep config's params first, then the command line.
    return expand_points(parser.parse_overrides([f"{k}={v}" for k, v in params.items()]) + parsed), base


# ---------------------------------------------------------------------------------------- estimates
def _device_count(trainer: DictConfig) -> int | None:
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1) or 1
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices) * nodes
    return None  # "auto" or -1: known only on the machine


def _strategy_name(trainer: DictConfig) -> str:
    strategy = trainer.get("strategy") or "auto"
    if isinstance(strategy, str):
        return strategy
    return str(strategy.get("_target_", "")).rsplit(".", 1)[-1]


def _shards_states(trainer: DictConfig) -> bool:
    return any(word in _strategy_name(trainer).lower() for word in ("fsdp", "deepspeed", "modelparallel"))


def _activation_checkpointing(trainer: DictConfig) -> bool:
    strategy = trainer.get("strategy")
    return bool(not isinstance(strategy, str) and strategy and strategy.get("activation_checkpointing"))


def activation_bytes(model_config: Any, cfg: DictConfig, act_bytes: int) -> float:
    """Activations kept for backward by one micro-batch on one device (see the module docstring)."""
    batch, seq = int(cfg.data.batch_size), int(cfg.data.block_size)
    layers, vocab = int(model_config.n_layer), int(model_config.vocab_size)
    width = int(getattr(model_config, "n_embd", 0) or getattr(model_config, "hidden_size", 0) or 0)
    if hasattr(model_config, "n_head"):
        per_layer_token = (34 * width + 5 * model_config.n_head * seq) * act_bytes / 2
    else:  # recurrent: gates, cell and hidden states, and the layer input
        per_layer_token = 10 * width * act_bytes
    if _activation_checkpointing(cfg.trainer):
        per_layer_token = width * act_bytes  # the block inputs; one block is recomputed at a time
    logits = batch * seq * vocab * 4 * 2  # fp32 logits for the loss, and their gradient
    return batch * seq * layers * per_layer_token + logits


def _optimizer_states(cfg: DictConfig) -> int:
    target = str(cfg.optim.get("_target_", "")).lower()
    return 2 if "adam" in target else 1 if cfg.optim.get("momentum") else 0


def estimate(point: PointPlan, cfg: DictConfig) -> None:
    """Fill in the parameters, FLOPs, tokens per step and memory of a valid point."""
    import torch

    from lmexp.builders import build_config_object
    from lmexp.perf import flops_per_token

    model_config = build_config_object(cfg.model, "model")
    if getattr(model_config, "vocab_size", None) is None:
        model_config.vocab_size = int(cfg.tokenizer.vocab_size)  # the tokenizer's size decides
    with torch.device("meta"):
        model = model_config.build()
    point.parameters = sum(p.numel() for p in model.parameters())
    point.flops_per_token = flops_per_token(model_config, int(cfg.data.block_size), model=model)
    devices = _device_count(cfg.trainer)
    point.devices = devices or 1
    accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1) or 1)
    point.tokens_per_step = int(cfg.data.batch_size) * int(cfg.data.block_size) * accumulate * point.devices
    weight, grad, state, act = PRECISION_BYTES.get(str(cfg.trainer.get("precision")), (4, 4, 4, 4))
    shards = point.devices if _shards_states(cfg.trainer) else 1
    point.memory = {
        "params": point.parameters * weight / shards,
        "grads": point.parameters * grad / shards,
        "optimizer": point.parameters * state * _optimizer_states(cfg) / shards,
        "activations": activation_bytes(model_config, cfg, act),
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

    from lmexp.builders import check_config

    point = PointPlan(num=num, overrides=overrides)
    try:
        cfg = _compose(overrides, f"{sweep_dir}/{num}")
        point.problems += _launcher_problems(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        check_config(cfg)
        estimate(point, cfg)
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
    from lmexp.sweep import swept_keys

    return swept_keys([{"overrides": p.overrides} for p in points])


def print_plan(points: list[PointPlan], base: DictConfig) -> None:
    """The table: one row per point."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from lmexp.sweep import override_values

    keys = swept_only(points)
    precision, strategy = base.trainer.get("precision"), _strategy_name(base.trainer)
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

    from lmexp.cli import config_dir

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
        names = {
            p.num: " ".join(o for o in p.overrides if o.split("=", 1)[0].lstrip("+~") in keys) for p in bad
        }
        raise ConfigError(
            [f"{len(bad)} of {len(points)} points are bad"]
            + [f"point {p.num} ({names[p.num]}): {', '.join(p.problems)}" for p in bad]
        )
    print(f"plan: all {len(points)} points are valid; nothing was trained or submitted")
    return points


def main(argv: list[str] | None = None) -> None:
    """Entry point: exit 0 when every point is valid, 2 (with one ``error:`` line) otherwise."""
    from lmexp.errors import full_errors_requested

    args = _split_args(list(sys.argv[1:] if argv is None else argv))
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return
    try:
        plan(args)
    except UserError as error:
        if full_errors_requested():
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
