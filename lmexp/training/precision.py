"""Lightning's precision settings, in one table: what each computes in and how many bytes it keeps.

``trainer.precision`` is checked against it (lmexp/training/trainer.py), ``lmexp.plan`` sizes memory with it,
and MFU picks the device's peak for its compute dtype (lmexp/training/perf.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Precision:
    """What one of Lightning's precision settings means for compute and memory."""

    compute: str
    """The dtype of the matrix multiplies: ``fp64``, ``fp32``, ``bf16`` or ``fp16``."""
    weight_bytes: int
    """Bytes per parameter kept (``*-mixed`` keeps fp32 weights)."""
    grad_bytes: int
    """Bytes per gradient."""
    state_bytes: int
    """Bytes per optimizer-state element (one of AdamW's two moments)."""
    activation_bytes: int
    """Bytes per activation element kept for the backward pass."""


_FP64, _FP32 = Precision("fp64", 8, 8, 8, 8), Precision("fp32", 4, 4, 4, 4)
_BF16_MIXED, _FP16_MIXED = Precision("bf16", 4, 4, 4, 2), Precision("fp16", 4, 4, 4, 2)
_BF16_TRUE, _FP16_TRUE = Precision("bf16", 2, 2, 2, 2), Precision("fp16", 2, 2, 2, 2)

# Every value Lightning 2.6 accepts for Trainer(precision=...), the short legacy spellings included.
PRECISIONS: dict[str | int, Precision] = {
    "64-true": _FP64, "64": _FP64, 64: _FP64,
    "32-true": _FP32, "32": _FP32, 32: _FP32,
    "bf16-mixed": _BF16_MIXED, "bf16": _BF16_MIXED,
    "16-mixed": _FP16_MIXED, "16": _FP16_MIXED, 16: _FP16_MIXED,
    "bf16-true": _BF16_TRUE,
    "16-true": _FP16_TRUE,
}  # fmt: skip

PrecisionName = Literal[tuple(PRECISIONS)]  # type: ignore[valid-type]


def precision_of(name: str | int) -> Precision:
    """The table entry of a precision setting (fp32 for anything unknown, which the schema rejects first)."""
    return PRECISIONS.get(name, PRECISIONS.get(str(name), _FP32))
