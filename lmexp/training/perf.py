"""Model FLOPs per token, counted from the model itself.

Convention (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", section 2.1; PaLM, Chowdhery et
al. 2022, appendix B): a training step costs 6 FLOPs per token for every parameter that takes part in a
matrix multiply (2 forward, 4 backward), plus the attention scores and the attention-weighted sum, which
have no parameters: per layer and token 2 * 2 * T * C forward (Q @ K^T and P @ V over all T positions),
times 3 for forward + backward, so 12 * n_layer * T * C. As in PaLM the attention term counts the full
T x T matrix even for a causal mask, so the figure is comparable with the published MFU numbers.

Embedding lookups cost no multiply: an ``nn.Embedding`` table is left out, unless its matrix is reused as
the output projection (tied weights), in which case the ``nn.Linear`` that holds it counts it.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def matmul_parameters(model: nn.Module) -> int:
    """Parameters used in matrix multiplies: everything except embedding tables, tied heads counted."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        # recurse=False: each module counts what it holds, so a tied head (an nn.Linear holding the
        # embedding's matrix) counts that matrix even though named_parameters() lists it once.
        total += sum(p.numel() for p in module.parameters(recurse=False))
    return total


def attention_flops_per_token(model_config: Any, seq_len: int) -> int:
    """Forward + backward FLOPs per token of attention scores and weighted sum (0 for recurrent models)."""
    if not hasattr(model_config, "n_head"):
        return 0
    return 12 * model_config.n_layer * model_config.n_embd * seq_len


def flops_per_token(model_config: Any, seq_len: int, model: nn.Module | None = None) -> int:
    """Training FLOPs per token (forward + backward) of the model ``model_config`` builds, at ``seq_len``.

    ``model`` saves building it when the caller has it; otherwise the model is built on the meta device,
    which allocates nothing.
    """
    if model is None:
        import torch

        with torch.device("meta"):
            model = model_config.build()
    return 6 * matmul_parameters(model) + attention_flops_per_token(model_config, seq_len)


# ------------------------------------------------------------------------------------ device peaks
# Dense (no structured sparsity) peak FLOP/s per GPU from NVIDIA's datasheets, by compute dtype. The
# datasheets print tensor-core figures "with sparsity", twice the dense ones; MFU is always reported
# against the dense peak, as in the PaLM paper and in nanoGPT, llm.c and torchtitan.
#   A100: A100 datasheet (SXM4 and PCIe alike); H100 / H200: H100 and H200 datasheets (SXM, NVL);
#   L40S, L40, L4: the Ada data-center datasheets; A10: A10 datasheet.
TFLOPS = 1e12
_DTYPES = ("fp32", "tf32", "bf16", "fp16")
_PEAK_TFLOPS = {  # chip: (fp32, tf32, bf16, fp16) in TFLOP/s, dense
    "a100": (19.5, 156, 312, 312),
    "a10": (31.2, 62.5, 125, 125),
    "h100-sxm": (66.9, 494.7, 989.4, 989.4),
    "h100-pcie": (51.2, 378, 756, 756),
    "h100-nvl": (60, 417.5, 835.5, 835.5),
    "h200-sxm": (67, 494.5, 989.5, 989.5),
    "h200-nvl": (60, 417.5, 835.5, 835.5),
    "l40s": (91.6, 183, 362, 362),
    "l40": (90.5, 90.5, 181, 181),
    "l4": (30.3, 60, 121, 121),
}
PEAK_FLOPS: dict[str, dict[str, float]] = {
    chip: {dtype: tera * TFLOPS for dtype, tera in zip(_DTYPES, peaks, strict=True)}
    for chip, peaks in _PEAK_TFLOPS.items()
}

# Device names as CUDA reports them (e.g. "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA L40S")
# -> table entry. The first row whose words all occur in the lower-cased name wins, so the more specific
# rows come first ("l40s" before "l40" before "l4", "a100" before "a10").
_CHIP_PATTERNS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("h200", "nvl"), "h200-nvl"),
    (("h200",), "h200-sxm"),  # also GH200, whose GPU has the H100 SXM's peaks
    (("h100", "nvl"), "h100-nvl"),
    (("h100", "pcie"), "h100-pcie"),
    (("h100",), "h100-sxm"),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (("a100",), "a100"),
    (("l40s",), "l40s"),
    (("l40",), "l40"),
    (("l4",), "l4"),
    (("a10",), "a10"),
)


def chip_of(device_name: str) -> str | None:
    """The :data:`PEAK_FLOPS` entry of a CUDA device name, or None for a device not in the table."""
    name = device_name.lower()
    for words, chip in _CHIP_PATTERNS:
        if all(word in name for word in words):
            return chip
    return None


def compute_dtype(precision: str | int, tf32_matmuls: bool = False) -> str | None:
    """``fp32``/``tf32``/``bf16``/``fp16`` for a Lightning precision (fp32 runs as tf32 when allowed)."""
    from lmexp.training.precision import PRECISIONS

    entry = PRECISIONS.get(precision, PRECISIONS.get(str(precision)))
    dtype = entry.compute if entry is not None else None
    if dtype == "fp32" and tf32_matmuls:
        return "tf32"
    return dtype


def peak_flops(device_name: str | None, precision: str | int, tf32_matmuls: bool = False) -> float | None:
    """Dense peak FLOP/s of one device at ``precision``; None for a CPU or a device not in the table.

    MFU is left out rather than guessed whenever this is None.
    """
    chip = chip_of(device_name) if device_name else None
    dtype = compute_dtype(precision, tf32_matmuls)
    if chip is None or dtype is None:
        return None
    return PEAK_FLOPS[chip].get(dtype)


def device_peak_flops(device: Any, precision: str | int) -> float | None:
    """:func:`peak_flops` of a ``torch.device`` (None on the CPU)."""
    import torch

    if getattr(device, "type", None) != "cuda":
        return None
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return peak_flops(torch.cuda.get_device_name(device), precision, tf32_matmuls=tf32)


def mfu(tokens_per_sec_per_device: float, flops_per_token_: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s of one device over its dense peak (None if unknown)."""
    if not peak:
        return None
    return tokens_per_sec_per_device * flops_per_token_ / peak
