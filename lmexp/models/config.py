"""What every model config shares: run-time validation, vocabulary padding, presets and ``to_dict``.

Each model's config is a dataclass that mixes in :class:`ModelConfig` and keeps only what is its own:
field declarations, presets, ``build()``, ``num_parameters()`` and ``supported_tasks``.
"""

from __future__ import annotations

import functools
import types
import typing
from dataclasses import fields
from typing import Any, ClassVar, TypeVar

from lmexp.errors import ConfigError

_Config = TypeVar("_Config", bound="ModelConfig")

_KINDS = (int, float, bool, str)  # the field types a model config may use, each optionally `| None`


@functools.cache
def _field_kinds(cls: type) -> tuple[tuple[str, type, bool], ...]:
    """``(field, kind, None allowed)`` for each field of the dataclass ``cls``, in declaration order.

    Derived from the annotations so a config cannot declare a field and forget to check it. Raises
    TypeError (a programming error, not a user one) for an annotation the checker does not understand.
    """
    hints = typing.get_type_hints(cls)
    kinds = []
    for field in fields(cls):
        hint = hints[field.name]
        args = typing.get_args(hint)
        if hint in _KINDS:
            kinds.append((field.name, hint, False))
        elif (
            typing.get_origin(hint) in (typing.Union, types.UnionType)
            and len(args) == 2
            and args[1] is type(None)
            and args[0] in _KINDS
        ):
            kinds.append((field.name, args[0], True))
        else:
            raise TypeError(
                f"{cls.__name__}.{field.name}: expected int, float, bool or str (| None), got {hint}"
            )
    return tuple(kinds)


def _type_problem(field: str, value: Any, kind: type, optional: bool) -> str | None:
    """Describe why ``value`` is not of ``kind``, or None if it is. bool is never accepted as a number."""
    article = "an" if kind is int else "a"
    if value is None:
        return None if optional else f"model.{field}=None: expected {article} {kind.__name__}"
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if ok:
        return None
    expected = f"{article} {kind.__name__}" + (" or null" if optional else "")
    return f"model.{field}={value!r}: expected {expected}, got {type(value).__name__}"


class ModelConfig:
    """Mixin for the model config dataclasses; validates on construction and reports all problems together.

    Every field must be annotated ``int``, ``float``, ``bool`` or ``str``, optionally ``| None``. Its type
    is checked at run time because Hydra/CLI overrides can deliver e.g. a str where an int is expected and a
    dataclass does not check its annotations. On top of that, whichever of these a config has:

    - every int field is a size or a count, so must be >= 1 (or None where the annotation allows it);
    - ``n_embd`` must be divisible by ``n_head``;
    - ``dropout`` must lie in [0, 1) and ``layer_norm_eps`` must be > 0.
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    """Named sizes for :meth:`from_preset`: preset name -> field values (YAML configs carry the same
    numbers). Not a field."""
    supported_tasks: ClassVar[tuple[str, ...]]
    """Training objectives this model can serve (matched against a task's ``task_name``); not a field."""

    # Fields every model config has; declared here for the vocabulary helpers (not dataclass fields of
    # the mixin itself, which is no dataclass).
    vocab_size: int | None
    pad_vocab_to_multiple: int

    def __post_init__(self) -> None:
        problems: list[str] = []
        valid: dict[str, Any] = {}  # field -> value, for the fields whose type is right
        kinds = _field_kinds(type(self))
        for field, kind, optional in kinds:
            value = getattr(self, field)
            problem = _type_problem(field, value, kind, optional)
            if problem is not None:
                problems.append(problem)
                continue
            if kind is float and value is not None:
                value = float(value)  # normalise ints given for floats (e.g. dropout=0)
                setattr(self, field, value)
            valid[field] = value

        def has(*names: str) -> bool:
            """Whether the config has all of ``names`` as fields, each with a value of the right type."""
            return all(name in valid for name in names)

        sizes = [(field, optional) for field, kind, optional in kinds if kind is int and has(field)]
        # Required sizes first, then the optional ones, so problems are listed in a fixed order.
        for field, optional in sorted(sizes, key=lambda size: size[1]):  # sorted() is stable
            value = valid[field]
            if optional and value is not None and value < 1:
                problems.append(f"model.{field}={value}: expected an int >= 1 or null")
            elif not optional and value < 1:
                problems.append(f"model.{field}={value}: expected an int >= 1")
        if has("n_embd", "n_head"):
            n_embd, n_head = valid["n_embd"], valid["n_head"]
            if n_embd >= 1 and n_head >= 1 and n_embd % n_head:
                problems.append(f"model.n_embd={n_embd} is not divisible by model.n_head={n_head}")
        if has("dropout") and not 0.0 <= valid["dropout"] < 1.0:
            problems.append(f"model.dropout={valid['dropout']}: expected a float in [0, 1)")
        if has("layer_norm_eps") and not valid["layer_norm_eps"] > 0.0:
            problems.append(f"model.layer_norm_eps={valid['layer_norm_eps']}: expected a float > 0")
        if problems:
            raise ConfigError(problems)

    @classmethod
    def from_preset(cls: type[_Config], preset: str, **overrides: Any) -> _Config:
        """A config from a named size in the class's :attr:`presets`, with ``overrides`` applied on top."""
        if preset not in cls.presets:
            raise ConfigError(f"model preset {preset!r} is unknown; expected one of {sorted(cls.presets)}")
        return cls(**{"name": preset, **cls.presets[preset], **overrides})

    def _require_vocab_size(self) -> int:
        """``vocab_size``, or a ConfigError if the caller has not filled it in yet."""
        if self.vocab_size is None:
            raise ConfigError(
                "model.vocab_size is not set: expected the tokenizer's vocabulary size to be filled in "
                "before the model is built"
            )
        return self.vocab_size

    @property
    def padded_vocab_size(self) -> int:
        """``vocab_size`` rounded up to a multiple of ``pad_vocab_to_multiple``."""
        vocab_size, multiple = self._require_vocab_size(), self.pad_vocab_to_multiple
        return -(-vocab_size // multiple) * multiple

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (for logging and checkpoints)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
