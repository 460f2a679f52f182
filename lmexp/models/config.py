"""What every model config shares: the typed-schema checks, the vocabulary size and its padding.

Each model kind's config is a dataclass in its model file (``GPTConfig`` in gpt.py, ...) that inherits
:class:`ModelConfig`; the field types, docstrings and ranges are checked by :mod:`lmexp.config.schema`, so
``GPTConfig(n_head=3)`` and ``model.n_head=3`` on the command line fail with the same one-line message.
"""

from __future__ import annotations

from typing import Any, ClassVar

from lmexp.config.schema import Schema
from lmexp.errors import ConfigError


class ModelConfig(Schema):
    """Base of the model config dataclasses (not a dataclass itself).

    Subclasses declare ``vocab_size: int | None`` (None = "the tokenizer's", filled in by the builder) and
    ``pad_vocab_to_multiple: int``, and implement :meth:`build` and :meth:`num_parameters`.
    """

    group: ClassVar[str] = "model"
    vocab_size: int | None
    pad_vocab_to_multiple: int

    @property
    def hidden_width(self) -> int:
        """Width of the final hidden states that task heads read (``n_embd`` for transformers)."""
        return int(self.n_embd)  # type: ignore[attr-defined]

    def build(self) -> Any:
        """Construct the model (on the current default device, e.g. inside ``with torch.device("meta")``)."""
        raise NotImplementedError

    def num_parameters(self) -> int:
        """Number of distinct parameters of the built model, computed without building it."""
        raise NotImplementedError

    def require_vocab_size(self) -> int:
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
        vocab_size, multiple = self.require_vocab_size(), self.pad_vocab_to_multiple
        return -(-vocab_size // multiple) * multiple


def heads_problem(n_embd: int, n_head: int) -> list[str]:
    """The transformers' one cross-field check: the heads must split the width evenly."""
    if n_embd % n_head:
        return [f"model.n_embd={n_embd} is not divisible by model.n_head={n_head}"]
    return []
