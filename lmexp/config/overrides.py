"""The one reader of command-line overrides (``optim.lr=1e-3``, ``+sweep=x``, ``~callbacks.progress_bar``).

Sweep records, W&B tags, the sweep summary, the report and the plan all look at a point's overrides; they all
go through these functions, so ``+``/``~``/``++`` prefixes and values holding ``=`` are read the same way
everywhere. Sweep syntax (``a=1,2``, ``interval(...)``) is parsed by Hydra's own parser in
:func:`expand_sweep`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any


def split(override: str) -> tuple[str, str | None]:
    """``(key, value)`` of one override: the key without ``+``/``++``/``~``; the value None for ``~key``."""
    key, sep, value = str(override).partition("=")
    return key.lstrip("+~"), value if sep else None


def key_of(override: str) -> str:
    """The config key an override sets (``+optim.lr=1`` -> ``optim.lr``)."""
    return split(override)[0]


def as_dict(overrides: Iterable[str]) -> dict[str, str]:
    """``{key: value}`` of the overrides that set a value (later ones win)."""
    pairs = (split(o) for o in overrides)
    return {key: value for key, value in pairs if value is not None}


def under(overrides: Iterable[str], prefixes: Sequence[str]) -> list[str]:
    """The overrides whose key is one of ``prefixes`` or lies below one (``sweep`` matches ``sweep.name``)."""
    return [o for o in overrides if any(_is_under(key_of(o), p) for p in prefixes)]


def without(overrides: Iterable[str], prefixes: Sequence[str]) -> list[str]:
    """The overrides whose key lies under none of ``prefixes``."""
    return [o for o in overrides if not any(_is_under(key_of(o), p) for p in prefixes)]


def _is_under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def expand_sweep(args: list[str], extra: dict[str, Any] | None = None) -> list[list[str]]:
    """Every point a basic sweep of ``args`` runs, as override lists (Hydra's parser; ``extra`` are a sweep
    config's ``hydra.sweeper.params``, applied before the command line as the sweepers do).

    A later override of a key replaces an earlier one in its place; interval sweeps (Optuna) contribute
    their two ends, so a plan checks the corners of a search space.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = parser.parse_overrides([f"{k}={v}" for k, v in (extra or {}).items()]) + parser.parse_overrides(
        args
    )
    axes: dict[str, list[str]] = {}
    for override in parsed:
        key = override.get_key_element()
        if not override.is_sweep_override():
            axes[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            axes[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            axes[key] = [f"{key}={value}" for value in _interval_ends(override)]
    return [list(combination) for combination in itertools.product(*axes.values())]


def fixed_only(args: list[str]) -> list[str]:
    """The arguments that are not sweeps (what every point shares)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(args)
    return [a for a, o in zip(args, parsed, strict=True) if not o.is_sweep_override()]


def _interval_ends(override: Any) -> list[str]:
    sweep = override.value()
    ends = [sweep.start, sweep.end]
    if all(float(e).is_integer() for e in ends) and not any(isinstance(e, float) for e in ends):
        ends = [int(e) for e in ends]
    return [str(e) for e in ends]
