"""Dynamic masking for masked language modelling (BERT's 80/10/10 recipe).

Masks are drawn anew for every batch, so a sequence seen in several epochs is masked differently each
time. :func:`mask_tokens` is pure tensor code (it runs on whatever device the batch is on, without host
syncs); :class:`MLMCollator` wraps it as a ``collate_fn`` for data loaders that should mask on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from lmexp.data.packing import IGNORE_INDEX
from lmexp.errors import ConfigError


@dataclass
class MaskingConfig:
    """The masking recipe; invalid values raise one :class:`ConfigError` naming every ``task.<field>``."""

    mask_rate: float = 0.15
    """Probability that each non-special token is selected for prediction."""
    replace_mask: float = 0.8
    """Of the selected tokens, the fraction replaced by ``[MASK]``."""
    replace_random: float = 0.1
    """Of the selected tokens, the fraction replaced by a random non-special token; the rest are kept."""

    def __post_init__(self) -> None:
        problems = _config_problems(self)
        if problems:
            raise ConfigError(problems)


def _is_number(value: object) -> bool:
    # bool is an int subclass, but `mask_rate: true` in a YAML file is a mistake, not 1.0.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _config_problems(config: MaskingConfig) -> list[str]:
    """Every problem with ``config``, each naming its ``task.<field>`` key."""
    problems: list[str] = []
    if not _is_number(config.mask_rate) or not 0 < config.mask_rate < 1:
        problems.append(f"task.mask_rate={config.mask_rate!r}: expected a number in (0, 1)")
    replace_ok = True
    for name in ("replace_mask", "replace_random"):
        value = getattr(config, name)
        if not _is_number(value) or not 0 <= value <= 1:
            problems.append(f"task.{name}={value!r}: expected a number in [0, 1]")
            replace_ok = False
    if replace_ok and config.replace_mask + config.replace_random > 1 + 1e-9:
        total = config.replace_mask + config.replace_random
        problems.append(
            f"task.replace_mask + task.replace_random = {total:g}: expected at most 1 "
            "(they are fractions of the selected tokens)"
        )
    return problems


def mask_tokens(
    input_ids: torch.Tensor,
    special_mask: torch.Tensor,
    config: MaskingConfig,
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


class MLMCollator:
    """``DataLoader(collate_fn=...)`` that stacks examples and masks their ``input_ids``.

    Examples are dicts of tensors (``input_ids``, ``token_type_ids``, ``attention_mask``, optional
    ``nsp_label``); every key is stacked, then ``input_ids`` is replaced by its masked version and
    ``labels`` is added. Positions holding a special id, and padding (``attention_mask == 0``), are never
    selected; random replacements are drawn from the rest of the vocabulary.

    The collator owns a ``torch.Generator``. It is (re)seeded from ``seed`` and, inside a DataLoader
    worker, that worker's seed, which torch draws afresh for every loader iterator from the loader's
    ``generator`` (or the global RNG): so workers mask differently from each other and from epoch to
    epoch, and the masks are reproducible when ``seed`` and the loader's RNG are seeded. In the main
    process (``num_workers=0``) the generator is seeded once and keeps advancing across epochs.
    """

    def __init__(
        self,
        tokenizer_special_ids: Iterable[int],
        mask_id: int,
        vocab_size: int,
        config: MaskingConfig,
        seed: int = 0,
    ) -> None:
        specials = {int(i) for i in tokenizer_special_ids} | {int(mask_id)}
        out_of_range = sorted(i for i in specials if not 0 <= i < vocab_size)
        if out_of_range:
            raise ValueError(f"MLMCollator: special ids {out_of_range} are outside [0, {vocab_size})")
        special_table = torch.zeros(vocab_size, dtype=torch.bool)
        special_table[sorted(specials)] = True
        random_ids = (~special_table).nonzero().flatten()
        if random_ids.numel() == 0:
            raise ValueError(f"MLMCollator: all {vocab_size} ids are special; no random replacement possible")
        self.special_table = special_table
        self.random_ids = random_ids
        self.mask_id = int(mask_id)
        self.config = config
        self.seed = int(seed)
        self._generator: torch.Generator | None = None
        self._seeded_for: tuple[int | None] | None = None  # the worker seed the generator was seeded for

    def generator(self) -> torch.Generator:
        """The generator for the current process, reseeded whenever the DataLoader worker seed changes."""
        info = torch.utils.data.get_worker_info()
        key = (None if info is None else int(info.seed),)
        if self._generator is None or self._seeded_for != key:
            entropy = [self.seed % 2**64] + ([] if key[0] is None else [key[0] % 2**64])
            state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
            self._generator = torch.Generator().manual_seed(int(state) & (2**63 - 1))
            self._seeded_for = key
        return self._generator

    def __call__(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("MLMCollator: got an empty list of examples")
        batch = {key: torch.stack([torch.as_tensor(ex[key]) for ex in examples]) for key in examples[0]}
        input_ids = batch["input_ids"].long()
        special = self.special_table[input_ids]
        if "attention_mask" in batch:
            special |= batch["attention_mask"] == 0
        batch["input_ids"], batch["labels"] = mask_tokens(
            input_ids, special, self.config, self.mask_id, self.random_ids, self.generator()
        )
        return batch

    def __getstate__(self) -> dict:
        # Spawned workers reseed anyway (their worker seed differs), so the generator need not travel.
        state = self.__dict__.copy()
        state["_generator"], state["_seeded_for"] = None, None
        return state
