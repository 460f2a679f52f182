"""Typed config schemas: every field documented, every problem found, collected and named."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest

import lmexp
from lmexp.config.schema import (
    Schema,
    at_least,
    between,
    field_docs,
    listed,
    parse,
    positive,
    signature_problems,
)
from lmexp.errors import ConfigError


@dataclass
class Example(Schema):
    """A schema with one field of each kind."""

    group: ClassVar[str] = "example"

    size: int = positive(4)
    """A size."""
    rate: float = between(0.5, 0.0, 1.0, high_open=True)
    """A rate in [0, 1)."""
    floor: float | None = at_least(None, 0.0)
    """An optional floor."""
    kind: Literal["a", "b"] = "a"
    """One of two kinds."""
    names: list[str] = listed(list)
    """Some names."""
    low: int = 0
    """Must not exceed ``size``."""

    def problems(self) -> list[str]:
        return [f"example.low={self.low} exceeds example.size={self.size}"] if self.low > self.size else []


def all_schemas() -> list[type]:
    """Every Schema dataclass in the lmexp package."""
    for module in pkgutil.walk_packages(lmexp.__path__, "lmexp."):
        importlib.import_module(module.name)
    found, todo = [], list(Schema.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if dataclasses.is_dataclass(cls) and cls.__module__.startswith("lmexp."):
            found.append(cls)
    return sorted(set(found), key=lambda c: c.__qualname__)


def test_every_field_of_every_schema_has_a_docstring() -> None:
    schemas = all_schemas()
    assert len(schemas) >= 15  # models, tasks, data, tokenizer, optim, scheduler, trainer, run options
    undocumented = [
        f"{cls.__module__}.{cls.__qualname__}.{field.name}"
        for cls in schemas
        for field in dataclasses.fields(cls)
        if not field_docs(cls).get(field.name)
    ]
    assert not undocumented


def test_problems_are_collected_and_named() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse(Example, {"size": 0, "rate": "fast", "kind": "c", "names": [1], "colour": "red"})
    assert excinfo.value.problems == [
        "example.colour is not a setting of Example (known: floor, kind, low, names, rate, size)",
        "example.size=0: expected a positive integer",
        "example.rate='fast': expected a number, got str",
        "example.kind='c' is not one of a, b",
        "example.names=[1]: expected a list of strings, got list",
    ]


def test_cross_field_problems_only_about_fields_that_are_right() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse(Example, {"low": 9, "rate": 2})
    assert excinfo.value.problems == [
        "example.rate=2: expected a number in [0, 1)",
        "example.low=9 exceeds example.size=4",
    ]
    with pytest.raises(ConfigError) as excinfo:
        parse(Example, {"low": 9, "size": -1})  # the size is wrong: comparing with it says nothing
    assert excinfo.value.problems == ["example.size=-1: expected a positive integer"]


def test_values_are_normalised_and_targets_ignored() -> None:
    example = parse(Example, {"_target_": "x.Example", "rate": 0, "floor": 2, "names": ("x",)})
    assert example.rate == 0.0 and isinstance(example.rate, float) and example.floor == 2.0
    for bad in (float("nan"), float("inf"), True):
        with pytest.raises(ConfigError, match="example.rate"):
            Example(rate=bad)


def test_missing_value_names_what_is_expected() -> None:
    with pytest.raises(ConfigError, match=r"^example.kind is not set: expected one of two kinds$"):
        parse(Example, {"kind": "???"})


def test_arguments_of_a_library_class_are_checked_by_signature() -> None:
    problems = signature_problems(
        "lmexp.training.distributed.FSDP2Strategy",
        {"state_dict": "both", "activation_checkpointing": 3, "shards": 2},
        "trainer.strategy",
    )
    assert problems == [
        "trainer.strategy.state_dict='both' is not one of sharded, full",
        "trainer.strategy.activation_checkpointing=3: expected true or false, got int",
        "trainer.strategy.shards is not an argument of FSDP2Strategy "
        "(known: activation_checkpointing, process_group_backend, state_dict)",
    ]
