"""Scaling-law ladders: an isoFLOP grid of model sizes for each compute budget (``+sweep=ladder``).

For every compute budget C in ``sweep.budgets`` (training FLOPs), a ladder trains several model sizes N,
each on D = C / (6 N) tokens, so that :mod:`lmexp.sweeps.scaling` can fit the isoFLOP parabolas and
L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, "Training Compute-Optimal Large Language
Models", approaches 2 and 3).

**Size rule.** One family of shapes, indexed by depth (Kaplan et al. 2020, "Scaling Laws for Neural
Language Models", section 3.1: at a fixed parameter count the loss depends little on the shape):
depth d from ``sweep.ladder.depths``, width = ``width_per_layer`` x d (a fixed aspect ratio; GPT-2's is
64), heads = width / ``head_dim``.

**N** is lmexp's own count of the parameters that take part in matrix multiplies
(:func:`lmexp.training.perf.matmul_parameters`, on the model built on the meta device from the point's
config):
every parameter except the embedding tables, with the output head counted (tied to the token embedding or
not). 6 N is then the per-token training cost lmexp's FLOP counter uses, less the attention-score term. The
head is most of a small model's compute; counting only non-embedding parameters at small scale skews the
fitted exponents (Pearce and Song 2024, "Reconciling Kaplan and Chinchilla Scaling Laws"; Porian et al.
2024, "Resolving Discrepancies in Compute-Optimal Scaling of Language Models", on the head's FLOPs).

**The grid.** Each point trains for steps = round(C / (6 N x tokens per step)). Per budget the ladder
takes the ``points_per_budget`` sizes nearest (in log N) to the expected optimum N ~ sqrt(C / (6 x
tokens_per_param)) (Hoffmann et al.: about 20 tokens per parameter) among the sizes that get at least
``min_steps`` steps. A budget that cannot give three sizes (an isoFLOP parabola needs three; or
``points_per_budget`` when that is 2) ``min_steps`` steps each is a :class:`~lmexp.errors.ConfigError`
naming the smallest budget that can.

**A point's overrides**: ``model.n_layer``, ``model.n_embd``, ``model.n_head`` (the size);
``trainer.max_steps`` (the cosine schedule follows it, so it decays over exactly the point's tokens, as
Hoffmann et al. found it must); ``scheduler.warmup_steps`` (a fraction of the steps);
``trainer.val_check_interval``; and ``sweep.budget``, the point's budget, which the fitter reads back.

The sweeper (``hydra/sweeper=ladder``, hydra_plugins/lmexp_sweep/ladder.py) and ``lmexp.plan`` both get
the points from :func:`ladder_points`, so what the plan shows is what runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmexp.errors import ConfigError

# The keys the ladder sets for every point; the command line must leave them to it.
SIZE_KEYS = ("model.n_layer", "model.n_embd", "model.n_head")
LADDER_KEYS = (*SIZE_KEYS, "trainer.max_steps", "scheduler.warmup_steps", "trainer.val_check_interval")
BUDGET_KEY = "sweep.budget"
# The metrics a ladder can fit: a loss of a language-model task (bits per word, or nats per token).
LADDER_METRICS = ("val/bpw", "val/loss")
PARABOLA_SIZES = 3  # an isoFLOP parabola in log N needs three sizes per budget
FLOPS_PER_PARAM_TOKEN = 6  # forward 2 + backward 4 FLOPs per parameter and token (Kaplan et al. 2.1)

# What each language-model task logs for an evaluation split (lmexp/tasks/clm.py and
# mlm.py); the tasks do not declare it, so it is listed here and checked by the ladder's tests.
_TASK_METRICS = {
    "clm": ("loss", "ppl", "acc", "bpw"),
    "mlm": ("loss", "mlm_loss", "ppl", "acc"),
}
_NSP_METRICS = ("nsp_loss", "nsp_acc", "nsp_f1")


# ------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class LadderSettings:
    """The size rule and grid settings of ``sweep.ladder`` (sweeps/ladder.yaml)."""

    depths: tuple[int, ...]
    """Candidate depths (model.n_layer), one model size each."""
    width_per_layer: int
    """Width (model.n_embd) = width_per_layer x depth: the aspect ratio of every size."""
    head_dim: int
    """Width of one attention head: heads = width / head_dim (must divide width_per_layer)."""
    points_per_budget: int
    """Sizes trained per budget (at least 2; the isoFLOP parabolas need 3, the L(N, D) fit does not)."""
    tokens_per_param: float
    """Expected compute-optimal tokens per parameter: centres each budget's sizes on N ~ sqrt(C/(6 x it))."""
    min_steps: int
    """A point gets at least this many optimizer steps; sizes that would get fewer are left out."""
    warmup_fraction: float
    """scheduler.warmup_steps = this fraction of the point's steps (at least 1)."""
    val_checks: int
    """Validations per point during training (trainer.val_check_interval = steps / val_checks)."""

    @classmethod
    def from_config(cls, node: Any) -> LadderSettings:
        """Read and check ``sweep.ladder``; every problem in one ConfigError."""
        if node is None:
            raise ConfigError("sweep.ladder is missing: use +sweep=ladder (sweeps/ladder.yaml)")
        values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
        problems: list[str] = []
        depths = values.get("depths")
        if (
            not isinstance(depths, (list, tuple))
            or not depths
            or not all(_is_int(d) and d > 0 for d in depths)
        ):
            problems.append(f"sweep.ladder.depths={depths}: expected a non-empty list of positive integers")
            depths = [1]
        integers = {"width_per_layer": 1, "head_dim": 1, "points_per_budget": 2}
        integers |= {"min_steps": 1, "val_checks": 1}
        for name, minimum in integers.items():
            if not _is_int(values.get(name)) or values[name] < minimum:
                problems.append(f"sweep.ladder.{name}={values.get(name)}: expected an integer >= {minimum}")
        tokens_per_param = values.get("tokens_per_param")
        if not _is_number(tokens_per_param) or tokens_per_param <= 0:
            problems.append(f"sweep.ladder.tokens_per_param={tokens_per_param}: expected a positive number")
        warmup = values.get("warmup_fraction")
        if not _is_number(warmup) or not 0 <= warmup < 1:
            problems.append(f"sweep.ladder.warmup_fraction={warmup}: expected a number in [0, 1)")
        unknown = sorted(set(values) - {f.name for f in cls.__dataclass_fields__.values()})
        problems += [f"sweep.ladder.{name} is not a ladder setting" for name in unknown]
        if not problems and values["width_per_layer"] % values["head_dim"]:
            problems.append(
                f"sweep.ladder.head_dim={values['head_dim']} does not divide "
                f"sweep.ladder.width_per_layer={values['width_per_layer']}"
            )
        if problems:
            raise ConfigError(problems)
        return cls(**{**values, "depths": tuple(sorted(set(depths)))})

    @property
    def min_sizes(self) -> int:
        """Sizes each budget must give ``min_steps`` steps: 3 (a parabola), or all when fewer are asked."""
        return min(self.points_per_budget, PARABOLA_SIZES)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def budget_text(budget: float) -> str:
    """A budget as it appears in overrides and tables (6 significant digits, e.g. ``3e+12``)."""
    return f"{budget:.6g}"


def _shown(value: Any) -> str:
    """A config value as the user would write it (numbers as 1e+12, not 1000000000000.0)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_shown(v) for v in value) + "]"
    if isinstance(value, float):
        return budget_text(value)
    return repr(value) if isinstance(value, str) else str(value)


def ladder_budgets(cfg: DictConfig) -> list[float]:
    """``sweep.budgets`` as sorted FLOP counts; ConfigError when empty, non-positive or repeated."""
    raw = OmegaConf.select(cfg, "sweep.budgets")
    values = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else raw
    expected = "expected a non-empty list of positive FLOP counts, e.g. 'sweep.budgets=[1e12,3e12,1e13]'"
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"sweep.budgets={_shown(values)}: {expected}")
    budgets = []
    for value in values:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
            raise ConfigError(
                f"sweep.budgets={_shown(values)}: {_shown(value)} is not a positive number; {expected}"
            )
        budgets.append(float(budget_text(number)))  # the value the points' overrides carry
    repeated = sorted({budget_text(b) for b in budgets if budgets.count(b) > 1})
    if repeated:
        raise ConfigError(f"sweep.budgets={_shown(values)}: {', '.join(repeated)} given more than once")
    return sorted(budgets)


def is_ladder(cfg: DictConfig) -> bool:
    """True for the config of a ladder (``+sweep=ladder``) or of one of its points (``sweep.ladder``)."""
    return OmegaConf.select(cfg, "sweep.ladder", default=None) is not None


# ---------------------------------------------------------------------------------------- the checks
def logged_metrics(cfg: DictConfig) -> list[str] | None:
    """The validation metrics the configured task logs, or None when it is not a language-model task."""
    task_name = _task_choice(cfg)
    names = _TASK_METRICS.get(task_name)
    if names is None:
        return None
    names = list(names)
    if task_name == "clm" and OmegaConf.select(cfg, "data.source", default=None) == "builtin":
        names.append("bpw_floor")  # the built-in corpus knows its entropy per word
    if task_name == "mlm" and cfg.task.get("nsp", True):
        names += _NSP_METRICS
    return [f"val/{name}" for name in names]


def _task_choice(cfg: DictConfig) -> str:
    """The task's name (``task=<name>``): the ``name`` of the task class its config builds."""
    from lmexp.config.settings import target_class

    return str(target_class(cfg.task, "task").task_type().name)


def metric_problems(cfg: DictConfig) -> list[str]:
    """The ladder fits ``objective``: it must be val/bpw or val/loss, logged by a language-model task."""
    objective = str(cfg.get("objective"))
    task = _task_choice(cfg)
    logged = logged_metrics(cfg)
    if logged is None:
        return [
            f"task={task}: a ladder fits the loss of a language-model task (task=clm or task=mlm), "
            f"not of task={task}"
        ]
    listing = f"task={task} logs {', '.join(logged)}"
    if objective not in LADDER_METRICS:
        return [f"objective={objective}: a ladder fits val/bpw or val/loss ({listing})"]
    if objective not in logged:
        return [f"objective={objective}: task={task} does not log it ({listing}); use objective=val/loss"]
    return []


def model_problems(cfg: DictConfig) -> list[str]:
    """The size rule sets depth, width and heads: the model must have all three."""
    missing = [key for key in SIZE_KEYS if key.split(".")[1] not in cfg.model]
    if missing:
        target = str(cfg.model.get("_target_", "?")).rsplit(".", 1)[-1]
        return [
            f"model ({target}) has no {', '.join(missing)}: a ladder sizes transformers by "
            f"{', '.join(SIZE_KEYS)} (model=gpt or model=bert)"
        ]
    return []


def argument_problems(arguments: Sequence[str]) -> list[str]:
    """The command line may not sweep (the ladder makes the points) nor set a key the ladder sets."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    problems = []
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        key = override.get_key_element().lstrip("+~")
        if override.is_sweep_override():
            problems.append(
                f"{override.input_line}: a ladder's points come from sweep.budgets; run one ladder per "
                f"value of {key} (with its own sweep.name)"
            )
        elif key in (*LADDER_KEYS, BUDGET_KEY):
            problems.append(f"{override.input_line}: {key} is set by the ladder for each point; leave it out")
    return problems


def _tokens_per_step(cfg: DictConfig) -> int:
    """Tokens per optimizer step: batch x block x accumulated micro-batches x devices x nodes."""
    trainer = cfg.trainer
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1) or 1
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        devices = len(devices)
    if not _is_int(devices) or devices < 1:
        raise ConfigError(
            f"trainer.devices={devices}: a ladder needs a fixed number of devices to count tokens per step"
        )
    accumulate = int(trainer.get("accumulate_grad_batches", 1) or 1)
    return int(cfg.data.batch_size) * int(cfg.data.block_size) * accumulate * devices * int(nodes)


# ------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class ModelSize:
    """One size of the ladder's family."""

    depth: int
    width: int
    heads: int
    params: int  # N: parameters in matrix multiplies (lmexp.training.perf.matmul_parameters)

    def overrides(self) -> list[str]:
        """The model overrides of this size."""
        return [f"model.n_layer={self.depth}", f"model.n_embd={self.width}", f"model.n_head={self.heads}"]


def count_parameters(cfg: DictConfig, depth: int, width: int, heads: int) -> int:
    """N of ``cfg.model`` at this size: its parameters in matrix multiplies, counted on the meta device.

    The vocabulary is the model's, or the tokenizer's when ``model.vocab_size`` is null, as in a run.
    """
    import torch

    from lmexp.config.settings import group
    from lmexp.training.perf import matmul_parameters

    config = group(cfg, "model", n_layer=depth, n_embd=width, n_head=heads)
    if getattr(config, "vocab_size", None) is None:
        config.vocab_size = int(cfg.tokenizer.vocab_size)
    with torch.device("meta"):
        model = config.build()
    return matmul_parameters(model)


def model_sizes(cfg: DictConfig, settings: LadderSettings) -> list[ModelSize]:
    """Every size of the rule, smallest first."""
    sizes = []
    for depth in settings.depths:
        width = settings.width_per_layer * depth
        heads = width // settings.head_dim
        sizes.append(ModelSize(depth, width, heads, count_parameters(cfg, depth, width, heads)))
    return sorted(sizes, key=lambda s: s.params)


# ---------------------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class LadderPoint:
    """One point of the ladder: a size trained for a budget's share of tokens."""

    budget: float
    size: ModelSize
    steps: int
    tokens_per_step: int
    warmup_steps: int | None  # None: the scheduler has no warm-up to scale
    val_check_interval: int

    @property
    def tokens(self) -> int:
        """D: training tokens."""
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        """6 N D: the compute the point actually gets (the budget, up to rounding of the steps)."""
        return FLOPS_PER_PARAM_TOKEN * self.size.params * self.tokens

    @property
    def overrides(self) -> list[str]:
        """The overrides that make a job this point."""
        overrides = [*self.size.overrides(), f"trainer.max_steps={self.steps}"]
        if self.warmup_steps is not None:
            overrides.append(f"scheduler.warmup_steps={self.warmup_steps}")
        overrides += [f"trainer.val_check_interval={self.val_check_interval}"]
        return [*overrides, f"{BUDGET_KEY}={budget_text(self.budget)}"]


def steps_for(budget: float, params: int, tokens_per_step: int) -> int:
    """Optimizer steps that spend ``budget`` FLOPs on a model of ``params`` (N): C / (6 N tokens_per_step)."""
    return math.floor(budget / (FLOPS_PER_PARAM_TOKEN * params * tokens_per_step) + 0.5)  # half up


def minimum_budget(sizes: Sequence[ModelSize], settings: LadderSettings, tokens_per_step: int) -> float:
    """The smallest budget that gives the ``min_sizes`` smallest sizes ``min_steps`` steps each."""
    largest_of_smallest = sizes[min(settings.min_sizes, len(sizes)) - 1].params
    return FLOPS_PER_PARAM_TOKEN * largest_of_smallest * tokens_per_step * settings.min_steps


def expected_optimum(budget: float, settings: LadderSettings) -> float:
    """The N each budget's sizes are centred on: C = 6 N D with D = tokens_per_param x N."""
    return math.sqrt(budget / (FLOPS_PER_PARAM_TOKEN * settings.tokens_per_param))


def budget_sizes(
    budget: float, sizes: Sequence[ModelSize], settings: LadderSettings, tokens_per_step: int
) -> list[ModelSize]:
    """The sizes of one budget: the ``points_per_budget`` nearest to its expected optimum (in log N) among
    the sizes that get at least ``min_steps`` steps, smallest first."""
    fitting = [s for s in sizes if steps_for(budget, s.params, tokens_per_step) >= settings.min_steps]
    centre = math.log(expected_optimum(budget, settings))
    nearest = sorted(fitting, key=lambda s: (abs(math.log(s.params) - centre), s.params))
    return sorted(nearest[: settings.points_per_budget], key=lambda s: s.params)


def _too_small(
    budgets: Sequence[float], sizes: Sequence[ModelSize], settings: LadderSettings, tokens_per_step: int
) -> str:
    smallest = sizes[: min(settings.min_sizes, len(sizes))]
    minimum = minimum_budget(sizes, settings, tokens_per_step)
    listed = ", ".join(budget_text(b) for b in budgets)
    depths = "-".join(str(s.depth) for s in (smallest[0], smallest[-1]))
    return (
        f"sweep.budgets: {listed} FLOPs {'is' if len(budgets) == 1 else 'are'} below the ladder's minimum "
        f"of {minimum:.3g} FLOPs: its {len(smallest)} smallest sizes (depth {depths}, N up to "
        f"{smallest[-1].params:,}) need sweep.ladder.min_steps={settings.min_steps} steps of "
        f"{tokens_per_step:,} tokens each (6 x N x tokens)"
    )


def plan_ladder(cfg: DictConfig, arguments: Sequence[str] | None = None) -> list[LadderPoint]:
    """Every point of the ladder ``cfg`` describes, budget by budget, smallest size first.

    ``arguments``: the command line of the sweep (default: ``hydra.overrides.task`` of ``cfg`` when it
    has a hydra node). Raises one ConfigError, before any job starts, for empty or non-positive budgets,
    a budget too small for the smallest sizes (naming the minimum), an objective the task does not log,
    a model without depth/width/heads, or a command line that sweeps or sets a key the ladder sets.
    """
    if arguments is None:
        arguments = [str(o) for o in (OmegaConf.select(cfg, "hydra.overrides.task", default=None) or [])]
    problems = argument_problems(arguments) + metric_problems(cfg) + model_problems(cfg)
    if problems:
        raise ConfigError(problems)
    settings = LadderSettings.from_config(OmegaConf.select(cfg, "sweep.ladder", default=None))
    budgets = ladder_budgets(cfg)
    tokens_per_step = _tokens_per_step(cfg)
    sizes = model_sizes(cfg, settings)
    if len(sizes) < settings.min_sizes:
        raise ConfigError(
            f"sweep.ladder.depths={list(settings.depths)}: {len(sizes)} sizes, fewer than "
            f"sweep.ladder.points_per_budget={settings.points_per_budget}"
        )
    grids = {b: budget_sizes(b, sizes, settings, tokens_per_step) for b in budgets}
    too_small = [b for b, grid in grids.items() if len(grid) < settings.min_sizes]
    if too_small:
        raise ConfigError(_too_small(too_small, sizes, settings, tokens_per_step))
    has_warmup = cfg.get("scheduler") is not None and "warmup_steps" in cfg.scheduler
    points = []
    for budget, grid in grids.items():
        for size in grid:
            steps = steps_for(budget, size.params, tokens_per_step)
            warmup = max(1, round(settings.warmup_fraction * steps)) if has_warmup else None
            interval = math.ceil(steps / settings.val_checks)
            points.append(LadderPoint(budget, size, steps, tokens_per_step, warmup, interval))
    return points


def ladder_points(cfg: DictConfig, arguments: Sequence[str] | None = None) -> list[list[str]]:
    """The overrides of every ladder point (what a sweep adds to its command line for each job)."""
    return [point.overrides for point in plan_ladder(cfg, arguments)]


# ----------------------------------------------------------------------------------------- display
def print_ladder(points: Sequence[LadderPoint], cfg: DictConfig) -> None:
    """The ladder as a table: budget, size, N, steps, tokens, tokens per parameter, compute."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    settings = LadderSettings.from_config(OmegaConf.select(cfg, "sweep.ladder"))
    budgets = sorted({p.budget for p in points})
    title = (
        f"lmexp ladder: {len(budgets)} budgets, {len(points)} points; objective {cfg.get('objective')}; "
        f"N = parameters in matrix multiplies, D = steps x {points[0].tokens_per_step:,} tokens, C = 6ND"
    )
    table = Table(title=title, title_justify="left")
    columns = ("#", "budget C", "N* guess", "depth", "width", "heads", "N", "steps", "tokens D", "D/N")
    for column in (*columns, "6ND"):
        table.add_column(column, justify="right")
    for num, point in enumerate(points):
        cells = [
            str(num),
            budget_text(point.budget),
            f"{expected_optimum(point.budget, settings):,.0f}",
            str(point.size.depth),
            str(point.size.width),
            str(point.size.heads),
            f"{point.size.params:,}",
            f"{point.steps:,}",
            f"{point.tokens:,}",
            f"{point.tokens / point.size.params:.1f}",
            f"{point.flops:.3g}",
        ]
        table.add_row(*(Text(c) for c in cells))
    Console(width=max(160, Console().width), highlight=False).print(table)
