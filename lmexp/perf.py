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
