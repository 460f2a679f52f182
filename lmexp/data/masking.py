"""Dynamic masking for masked language modelling (BERT's 80/10/10 recipe).

Masks are drawn anew for every batch, so a sequence seen in several epochs is masked differently each
time. :func:`mask_tokens` is pure tensor code: the masked-LM task calls it on the batch's device, without
host syncs, with a generator seeded per batch (lmexp/tasks/mlm.py).
"""

from __future__ import annotations

from typing import Protocol

import torch

from lmexp.data.packing import IGNORE_INDEX


class MaskingRecipe(Protocol):
    """The masking recipe (``task.mask_rate``, ``task.replace_mask``, ``task.replace_random``: the masked-LM
    task's config, :class:`lmexp.tasks.mlm.MLMConfig`, which checks the values)."""

    mask_rate: float
    replace_mask: float
    replace_random: float


def mask_tokens(
    input_ids: torch.Tensor,
    special_mask: torch.Tensor,
    config: MaskingRecipe,
    mask_id: int,
    random_ids: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a batch for MLM; returns ``(masked_input_ids, labels)``.

    Args:
        input_ids: (B, T) int64 token ids.
        special_mask: (B, T) bool, True at special tokens and padding; those are never selected.
        config: the masking recipe.
        mask_id: the id of ``[MASK]``.
        random_ids: 1-D ids that may be drawn as random replacements (the non-special vocabulary).
        generator: the random source; its device is used for the draws (default: torch's global one).

    Selection is a Bernoulli(``mask_rate``) draw per eligible position. A sequence with eligible tokens
    but no selected one gets exactly one selected position, chosen uniformly among its eligible tokens,
    so every sequence contributes to the loss (short sequences would otherwise often be wasted). This
    adds on average ``(1 - mask_rate) ** n`` selected tokens to a sequence of ``n`` eligible tokens, which
    is negligible except for very short sequences.

    ``labels`` holds the original id at selected positions and -100 elsewhere. Of the selected positions,
    a fraction ``replace_mask`` becomes ``mask_id``, ``replace_random`` a uniform draw from ``random_ids``
    (which may equal the original token, as in BERT), and the rest keep their token.
    """
    if input_ids.dim() != 2 or special_mask.shape != input_ids.shape:
        raise ValueError(
            f"mask_tokens: expected input_ids (B, T) and special_mask of the same shape, got "
            f"{tuple(input_ids.shape)} and {tuple(special_mask.shape)}"
        )
    if random_ids.dim() != 1 or random_ids.numel() == 0:
        raise ValueError("mask_tokens: random_ids must be a non-empty 1-D tensor of token ids")
    eligible = ~special_mask.to(torch.bool)
    selected = _select(eligible, config.mask_rate, generator)
    choice = _uniform(input_ids.shape, input_ids.device, generator)
    to_mask = selected & (choice < config.replace_mask)
    to_random = selected & ~to_mask & (choice < config.replace_mask + config.replace_random)
    draws = _randint(len(random_ids), input_ids.shape, input_ids.device, generator)
    random_tokens = random_ids.to(input_ids.device)[draws].to(input_ids.dtype)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(to_random, random_tokens, masked)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked, labels


def _select(eligible: torch.Tensor, rate: float, generator: torch.Generator | None) -> torch.Tensor:
    """Bernoulli(rate) selection of eligible positions, plus one forced position in rows with none."""
    scores = _uniform(eligible.shape, eligible.device, generator)
    selected = eligible & (scores < rate)
    # The eligible position with the smallest score is uniform among the row's eligible positions (the
    # scores are i.i.d.), so reusing them avoids a second draw; scatter rather than branching on
    # `needs_one.any()` keeps the whole function free of device-to-host syncs.
    needs_one = eligible.any(dim=1) & ~selected.any(dim=1)
    nearest = scores.masked_fill(~eligible, 2.0).argmin(dim=1, keepdim=True)
    forced = torch.zeros_like(selected).scatter_(1, nearest, needs_one.unsqueeze(1))
    return selected | forced


def _uniform(shape: torch.Size, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """U[0, 1) draws of ``shape`` on ``device``, taken from ``generator`` (on its own device)."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def _randint(
    high: int, shape: torch.Size, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """Uniform integers in [0, high) of ``shape`` on ``device``, taken from ``generator``."""
    source = generator.device if generator is not None else device
    return torch.randint(high, shape, generator=generator, device=source).to(device)
