"""The output layer and the cross-entropy loss in one pass over chunks of rows, without the full logits.

A language model's last Linear maps N = B*T hidden states to V vocabulary logits. Computed the plain way
(``F.cross_entropy(lm_head(h), y)``), training materialises four (N, V) float tensors: the logits, their
log-softmax, the gradient of the loss w.r.t. the log-softmax and the one w.r.t. the logits; at batch 8,
sequence 256 and V = 4032 that is 33 MB each, written and read several times per step, and on a GPU
with a 50k vocabulary it is most of the activation memory.

The loss is the end of the graph, so the gradient of the summed NLL w.r.t. the logits,
``softmax(z) - onehot(y)``, is already known in the forward pass. :func:`linear_cross_entropy` therefore
walks the rows in chunks: each chunk computes its logits, turns them in place into that gradient and folds
it at once into the gradients of the hidden states and of the weight (the same three matmuls as the plain
forward and backward). The backward pass only scales the stored gradients by the incoming one. Extra
memory is one chunk of logits plus the gradients of ``hidden`` and ``weight``, which training needs anyway.
Without gradients (validation) the chunks only compute the loss and the predictions.

Under ``torch.compile`` the plain formula is used instead: the compiler fuses it itself.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Logit elements per chunk. Chunks bound the extra memory; within that, bigger is faster here: on a
# 2-core CPU, chunks of 1,000 rows x 4,032 logits (16 MB) ran as fast as one chunk of all 2,048 rows and
# ~3% faster than chunks of 256 rows (bench/RESULTS.md). A GPU wants bigger kernels still.
CPU_CHUNK_ELEMENTS = 2**22
GPU_CHUNK_ELEMENTS = 2**26


class HeadLoss(NamedTuple):
    """Summed loss and greedy predictions of the rows given to :func:`linear_cross_entropy`."""

    nll_sum: torch.Tensor
    """() float32: summed negative log-likelihood over the rows whose label is not ignored."""
    predictions: torch.Tensor
    """(N,) long: the argmax over the first ``n_classes`` logits of each row (no gradient)."""


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    n_classes: int | None = None,
    chunk_rows: int | None = None,
) -> HeadLoss:
    """Summed cross-entropy of ``F.linear(hidden, weight, bias)`` against ``labels``, computed in chunks.

    Equal to ``F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, ignore_index=-100,
    reduction="sum")`` in value and gradients (up to float rounding), with greedy predictions besides.

    Args:
        hidden: (N, C) inputs of the output layer.
        weight: (V, C) output-layer weight (a tied embedding matrix works as is).
        bias: (V,) output-layer bias or None.
        labels: (N,) target ids; -100 marks rows that carry no loss.
        n_classes: Predictions consider only the first ``n_classes`` logits (the real vocabulary of a
            padded one); None = all V.
        chunk_rows: Rows per chunk; None picks about 16 MB of float32 logits per chunk on a CPU, 256 MB
            on a GPU.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"expected hidden (N, C) and labels (N,), got {tuple(hidden.shape)} and {tuple(labels.shape)}"
        )
    n_classes = n_classes or weight.shape[0]
    if torch.compiler.is_compiling():
        return _plain(hidden, weight, bias, labels, n_classes)
    if chunk_rows is None:
        elements = CPU_CHUNK_ELEMENTS if hidden.device.type == "cpu" else GPU_CHUNK_ELEMENTS
        chunk_rows = max(1, elements // weight.shape[0])
    nll_sum, predictions = _ChunkedLinearCrossEntropy.apply(
        hidden, weight, bias, labels, n_classes, chunk_rows
    )
    return HeadLoss(nll_sum, predictions)


def logits_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, n_classes: int | None = None
) -> HeadLoss:
    """The :class:`HeadLoss` of ready logits (N, V) against ``labels`` (N,): for a model whose output layer
    is more than a Linear (e.g. logit soft-capping), where :func:`linear_cross_entropy` cannot stand in."""
    logits = logits.float()
    nll_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return HeadLoss(nll_sum, logits[:, : n_classes or logits.shape[1]].detach().argmax(dim=-1))


def _plain(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    n_classes: int,
) -> HeadLoss:
    logits = F.linear(hidden, weight, bias).float()  # (N, V)
    nll_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return HeadLoss(nll_sum, logits[:, :n_classes].detach().argmax(dim=-1))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, when inputs need them, their gradients; backward scales those."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        n_classes: int,
        chunk_rows: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        wants_hidden, wants_weight, wants_bias = ctx.needs_input_grad[:3]
        ctx.dtypes = (hidden.dtype, weight.dtype)
        N = hidden.shape[0]
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):  # mixed precision: matmuls in the autocast dtype
            compute_dtype = torch.get_autocast_dtype(device_type)
        else:
            compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        weight_c = weight.to(compute_dtype)  # (V, C); no copy when it already has that dtype
        bias_c = None if bias is None else bias.to(compute_dtype)  # (V,)
        nll_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        predictions = torch.empty(N, dtype=torch.long, device=hidden.device)  # (N,)
        grad_hidden = torch.empty_like(hidden) if wants_hidden else None  # (N, C)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_weight else None  # (V, C)
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if wants_bias else None  # (V,)
        for start in range(0, N, chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, y = hidden[rows].to(compute_dtype), labels[rows]  # (n, C), (n,)
            z = F.linear(h, weight_c, bias_c).float()  # (n, V); float() is a no-op in float32
            predictions[rows] = z[:, :n_classes].argmax(dim=-1)  # (n,)
            carries_loss = y != IGNORE_INDEX  # (n,)
            target = torch.where(carries_loss, y, 0)[:, None]  # (n, 1): any valid index on ignored rows
            log_probs = torch.log_softmax(z, dim=-1)  # (n, V)
            nll = -log_probs.gather(1, target).squeeze(1)  # (n,)
            nll_sum += (nll * carries_loss).sum()
            if not (wants_hidden or wants_weight or wants_bias):
                continue
            # d(summed NLL)/d(logits) = softmax(z) - onehot(y), for the rows that carry a loss. Ignored rows
            # are zeroed on the narrow side instead (their h and their grad_hidden rows): one pass less
            # over the (n, V) block.
            grad_logits = log_probs.exp_()  # (n, V): softmax, in place
            grad_logits.scatter_add_(1, target, -torch.ones_like(target, dtype=grad_logits.dtype))
            g = grad_logits.to(compute_dtype)  # (n, V); a no-op in float32
            keep = carries_loss[:, None].to(compute_dtype)  # (n, 1)
            if wants_hidden:
                torch.mul(g @ weight_c, keep, out=grad_hidden[rows])  # (n, C)
            if wants_weight:
                if compute_dtype == torch.float32:
                    grad_weight.addmm_(g.t(), h * keep)  # (V, C), accumulated in place
                else:
                    grad_weight += g.t() @ (h * keep)  # (V, C)
            if wants_bias:
                grad_bias += (keep.t().float() @ grad_logits).squeeze(0)  # (V,)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.mark_non_differentiable(predictions)
        return nll_sum, predictions

    @staticmethod
    def backward(ctx: Any, grad_nll_sum: torch.Tensor, _grad_predictions: Any) -> tuple:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors

        def scaled(grad: torch.Tensor | None, like: torch.dtype) -> torch.Tensor | None:
            return None if grad is None else (grad * grad_nll_sum).to(like)

        hidden_dtype, weight_dtype = ctx.dtypes
        return (
            scaled(grad_hidden, hidden_dtype),
            scaled(grad_weight, weight_dtype),
            scaled(grad_bias, weight_dtype),
            None,
            None,
            None,
        )
