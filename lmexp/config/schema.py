"""Typed config schemas: one dataclass per config group, checked field by field, every problem collected.

Each group's YAML file names its schema with ``_target_`` (``conf/optim/adamw.yaml`` ->
:class:`lmexp.tasks.optim.OptimizerConfig`), and the schema lives next to the code it configures. A schema is
a dataclass that inherits :class:`Schema`; each field has

* a type annotation: ``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, ``list[T]``, ``dict[str, T]``,
  ``Any``, or a union of them with ``None``;
* a one-line docstring: the string right below the field (``tests/config/test_schema.py`` checks that every
  field of every schema has one);
* where its value has a range, a constraint made by :func:`positive`, :func:`at_least` or :func:`between`;
  where it names a file or directory, :func:`plain_name` (no ``/``, ``..`` or absolute path).

A ``str`` field whose default is not empty must not be empty either (an empty name, field or objective means
nothing).
* a field typed with another schema (``lora: LoRAOptions``) is a nested node: its mapping is parsed into that
  schema, and its problems are named ``<group>.<field>.<key>``.

Constructing a schema checks every field (types, ranges) and the schema's own cross-field
:meth:`Schema.problems` (those naming a field found wrong are left out); all problems are raised together as
one :class:`~lmexp.errors.ConfigError`, each naming its key (``optim.lr=-1: expected a positive number``).
:func:`parse` builds a schema from a config node and adds the keys the schema does not know.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import re
import textwrap
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeVar

from lmexp.errors import ConfigError

S = TypeVar("S", bound="Schema")


# ------------------------------------------------------------------------------------------ constraints
def positive(default: Any) -> Any:
    """A field whose value must be > 0 (an int field: >= 1)."""
    return dataclasses.field(default=default, metadata={"gt": 0})


def at_least(default: Any, low: float) -> Any:
    """A field whose value must be >= ``low``."""
    return dataclasses.field(default=default, metadata={"ge": low})


def between(default: Any, low: float, high: float, high_open: bool = False, low_open: bool = False) -> Any:
    """A field whose value must lie in [low, high] (``low_open``/``high_open`` exclude an end)."""
    return dataclasses.field(
        default=default, metadata={"gt" if low_open else "ge": low, "lt" if high_open else "le": high}
    )


def plain_name(default: str) -> Any:
    """A field that names a file or directory inside the output dir: one path component (see
    :func:`name_problem`)."""
    return dataclasses.field(default=default, metadata={"plain_name": True})


def name_problem(value: Any) -> str | None:
    """Why ``value`` cannot be one file or directory name inside lmexp's output dir, or None.

    A ``/`` or ``\\`` would make it a path, ``..`` or an absolute path one that leaves the output dir.
    """
    if not isinstance(value, str):
        return None  # a type problem, reported as such
    if value in ("", ".", "..") or "/" in value or "\\" in value or any(ord(c) < 32 for c in value):
        return (
            "expected a plain name (not empty, '.' or '..'; no '/', '\\' or control characters): it names a "
            "directory or file inside the output dir, and a path could write outside it"
        )
    return None


def listed(factory: Any) -> Any:
    """A list or dict field with a mutable default."""
    return dataclasses.field(default_factory=factory)


# --------------------------------------------------------------------------------------------- schema
class Schema:
    """Base of every config schema: validates on construction, reporting all problems together.

    ``group`` is the config key the fields live under (``model``, ``optim``, ...; empty for top-level keys),
    used in every message.
    """

    group: ClassVar[str] = ""

    def __post_init__(self) -> None:
        problems = nested_problems(self, self.group)
        problems += field_problems(self, self.group)
        problems += self._cross_field_problems(problems)
        if problems:
            raise ConfigError(problems)

    def _cross_field_problems(self, field_problems: list[str]) -> list[str]:
        """:meth:`problems`, without those that name a field already found wrong (and nothing when a
        wrong-typed field makes the check itself fail)."""
        try:
            cross = self.problems()
        except Exception:  # noqa: BLE001 - a field of the wrong type; it is reported already
            return []
        bad = [re.escape(problem.split("=")[0].split(" ")[0]) for problem in field_problems]
        if not bad:
            return cross
        names_a_bad_field = re.compile(rf"(?<![\w.])({'|'.join(bad)})(?![\w])")
        return [problem for problem in cross if not names_a_bad_field.search(problem)]

    def problems(self) -> list[str]:
        """Cross-field problems (e.g. ``n_embd`` not divisible by ``n_head``), each naming its keys."""
        return []

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field, nested schemas as dicts too (for checkpoints and logs)."""
        return {
            f.name: value.to_dict() if isinstance(value := getattr(self, f.name), Schema) else value
            for f in dataclasses.fields(self)
        }

    @classmethod
    def passes_through(cls, name: str) -> bool:
        """Whether an unknown key ``name`` is an argument of the object built from this schema, kept in the
        schema's ``extra`` mapping (the Trainer's many arguments); False: an unknown key is an error."""
        return False


MISSING = "???"  # OmegaConf's mark of a value the user must give


def _expected(schema: type, name: str) -> str:
    doc = field_docs(schema).get(name, "")
    sentence = doc.split(". ")[0].rstrip(".")
    return sentence[:1].lower() + sentence[1:] if sentence else "a value"


def parse(schema: type[S], node: Any, key: str | None = None, **extra: Any) -> S:
    """An instance of ``schema`` from a config node (a DictConfig or a dict), with ``extra`` values on top.

    ``_target_`` (which names the schema in YAML) is ignored. Raises one ConfigError naming every unknown
    key and every bad value.
    """
    key = schema.group if key is None else key
    values = plain(node)
    if not isinstance(values, dict):
        raise ConfigError(f"{key}={values!r}: expected a mapping of settings")
    values.pop("_target_", None)
    values.pop("_partial_", None)
    values.update(extra)
    known = [f.name for f in dataclasses.fields(schema) if f.init]
    missing = [name for name in known if values.get(name) == MISSING]
    passed = {n: values.pop(n) for n in list(values) if n not in known and schema.passes_through(n)}
    if passed:
        values["extra"] = {**values.get("extra", {}), **passed}
    unknown = [
        f"{_join(key, name)} is not a setting of {schema.__name__} (known: {', '.join(sorted(known))})"
        for name in values
        if name not in known
    ] + [f"{_join(key, name)} is not set: expected {_expected(schema, name)}" for name in missing]
    for name in missing:
        del values[name]
    try:
        instance = schema(**{k: v for k, v in values.items() if k in known})
    except ConfigError as error:
        raise ConfigError(unknown + error.problems) from None
    if unknown:
        raise ConfigError(unknown)
    return instance


def collect(problems: list[str], build: Any) -> Any:
    """``build()``, or None with its ConfigError's problems appended to ``problems``."""
    try:
        return build()
    except ConfigError as error:
        problems.extend(error.problems)
        return None


def plain(node: Any) -> Any:
    """A config node as plain Python values, interpolations resolved."""
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(node, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(node, resolve=True)
        except OmegaConfBaseException as error:
            raise ConfigError(" ".join(str(error).split("\n")[0].split())) from None
    if isinstance(node, Mapping):
        return dict(node)
    return node


# --------------------------------------------------------------------------------------- field checks
def nested_problems(obj: Any, group: str) -> list[str]:
    """Parse every nested-schema field of ``obj`` given as a mapping (or null: the schema's defaults) into its
    schema; returns their problems. A field left as it was fails the type check after this."""
    problems: list[str] = []
    hints = _hints(type(obj))
    for field in dataclasses.fields(obj):
        schema, value = hints[field.name], getattr(obj, field.name)
        if not (isinstance(schema, type) and issubclass(schema, Schema)) or isinstance(value, schema):
            continue
        if value is None or isinstance(value, Mapping):
            try:
                setattr(obj, field.name, parse(schema, value or {}, _join(group, field.name)))
            except ConfigError as error:
                problems.extend(error.problems)
                setattr(obj, field.name, schema())  # reported above; the defaults keep later checks quiet
    return problems


def field_problems(obj: Any, group: str) -> list[str]:
    """Type and range problems of every field of the dataclass instance ``obj``; normalises ints in float
    fields to floats."""
    problems = []
    hints = _hints(type(obj))
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        problem = type_problem(value, hints[field.name])
        key = _join(group, field.name)
        if problem is None:
            problem = range_problem(value, field.metadata, hints[field.name])
        if problem is None and field.metadata.get("plain_name"):
            problem = name_problem(value)
        if problem is None and value == "" and hints[field.name] is str and field.default != "":
            problem = "expected a non-empty string"
        if problem is not None:
            glue = " " if problem.startswith("is not") else ": "
            problems.append(f"{key}={_show(value)}{glue}{problem}")
        elif _is_float_field(hints[field.name]) and isinstance(value, int) and not isinstance(value, bool):
            setattr(obj, field.name, float(value))
    return problems


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _join(group: str, name: str) -> str:
    return f"{group}.{name}" if group else name


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _is_float_field(hint: Any) -> bool:
    """A float field (optionally nullable) whose int values become floats; ``int | float`` keeps its ints."""
    if _is_union(hint):
        return set(typing.get_args(hint)) == {float, type(None)}
    return hint is float


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit the annotation ``hint`` (``expected an int, got str``), or None."""
    if _fits(value, hint):
        return None
    if typing.get_origin(hint) is Literal:
        return f"is not one of {', '.join(str(c) for c in typing.get_args(hint))}"
    got = type(value).__name__ if value is not None else "null"
    return f"expected {describe(hint)}, got {got}"


def _fits(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if _is_union(hint):
        return any(_fits(value, option) for option in typing.get_args(hint))
    origin = typing.get_origin(hint)
    if origin is Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(hint))
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(_fits(v, item) for v in value)
    if origin is dict:
        _, item = typing.get_args(hint) or (str, Any)
        return isinstance(value, dict) and all(
            isinstance(k, str) and _fits(v, item) for k, v in value.items()
        )
    if hint is int:
        return _is_int(value)
    if hint is float:
        return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return isinstance(value, hint)


def describe(hint: Any) -> str:
    """Words for an annotation: ``an int``, ``a number``, ``one of bpe, unigram``, ``a list of numbers``."""
    if _is_union(hint):
        options = [o for o in typing.get_args(hint) if o is not type(None)]
        text = " or ".join(describe(o) for o in options)
        return text + (" or null" if len(options) < len(typing.get_args(hint)) else "")
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(str(c) for c in typing.get_args(hint))
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return f"a list of {_plural(describe(item))}"
    if origin is dict:
        return "a mapping"
    names = {int: "an int", float: "a number", bool: "true or false", str: "a string", Any: "a value"}
    return names.get(hint, f"a {getattr(hint, '__name__', hint)}")


def _plural(words: str) -> str:
    return {"an int": "ints", "a number": "numbers", "a string": "strings"}.get(words, words)


def range_problem(value: Any, metadata: Mapping[str, Any], hint: Any = float) -> str | None:
    """Why ``value`` breaks the field's constraint, or None (None and non-numbers are not ranged)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    ge, gt, le, lt = (metadata.get(k) for k in ("ge", "gt", "le", "lt"))
    if (
        (ge is None or value >= ge)
        and (gt is None or value > gt)
        and (le is None or value <= le)
        and (lt is None or value < lt)
    ):
        return None
    integral = hint is int or (_is_union(hint) and set(typing.get_args(hint)) == {int, type(None)})
    kind = "an int" if integral else "a number"
    if gt == 0 and le is None and lt is None:
        return "expected a positive integer" if kind == "an int" else "expected a positive number"
    if (ge is not None or gt is not None) and (le is not None or lt is not None):
        left = f"[{ge:g}" if ge is not None else f"({gt:g}"
        right = f"{le:g}]" if le is not None else f"{lt:g})"
        return f"expected {kind} in {left}, {right}"
    bound = [f">= {ge:g}" if ge is not None else None, f"> {gt:g}" if gt is not None else None]
    bound += [f"<= {le:g}" if le is not None else None, f"< {lt:g}" if lt is not None else None]
    return f"expected {kind} {' and '.join(b for b in bound if b)}"


def signature_problems(target: Any, values: Mapping[str, Any], key: str) -> list[str]:
    """Problems of ``values`` as keyword arguments of ``target`` (a callable, or its import path): unknown
    names (unless it takes ``**kwargs``) and values that do not fit simple annotations. For config nodes that
    instantiate a library object (a strategy, a logger, a callback) rather than a schema."""
    if isinstance(target, str):
        import hydra.utils

        try:
            target = hydra.utils.get_method(target) if "." in target else None
        except Exception:  # noqa: BLE001 - any import problem is the user's _target_
            return [f"{key}._target_={target}: cannot be imported"]
    try:
        signature = inspect.signature(target)
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except (TypeError, ValueError, NameError):
        return []
    params = signature.parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    problems = []
    for name, value in values.items():
        if name.startswith("_") and name.endswith("_"):
            continue  # _target_, _partial_, _convert_
        if name not in params:
            if not open_ended:
                known = ", ".join(sorted(n for n in params if n not in ("self", "args", "kwargs")))
                problems.append(f"{key}.{name} is not an argument of {target.__name__} (known: {known})")
            continue
        hint = hints.get(name)
        if hint is not None and _is_simple(hint):
            problem = type_problem(value, hint)
            if problem is not None:
                glue = " " if problem.startswith("is not") else ": "
                problems.append(f"{key}.{name}={_show(value)}{glue}{problem}")
    return problems


def _is_simple(hint: Any) -> bool:
    """Annotations :func:`type_problem` judges reliably (no library classes, callables or generics)."""
    if _is_union(hint):
        return all(_is_simple(option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return True
    return hint in (int, float, bool, str, type(None))


# ------------------------------------------------------------------------------------------ field docs
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` read from the class source: the string literal right below each field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body
        for statement, following in zip(body, body[1:], strict=False):
            if (
                isinstance(statement, ast.AnnAssign)
                and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[statement.target.id] = " ".join(following.value.value.split())
    return docs
