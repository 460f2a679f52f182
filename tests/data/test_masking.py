"""Tests for dynamic MLM masking (lmexp.data.masking)."""

from __future__ import annotations

import pytest
import torch

from lmexp.data.masking import mask_tokens
from lmexp.errors import ConfigError
from lmexp.tasks.mlm import MLMConfig as MaskingConfig  # the masking recipe is the task config's

PAD, CLS, SEP, MASK = 0, 5, 6, 4
SPECIAL_IDS = [0, 1, 2, 3, CLS, SEP, MASK]
VOCAB = 1000
# Originals are drawn below 500 and random replacements from 500 up, so every replacement is identifiable.
ORIGINAL_HIGH = 500
RANDOM_IDS = torch.arange(ORIGINAL_HIGH, VOCAB)


def make_batch(n_rows: int = 512, length: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[CLS] tokens ... [SEP] tokens ... [SEP] pad ...`` and their special/padding mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, ORIGINAL_HIGH, (n_rows, length), generator=g)
    ids[:, 0] = CLS
    ids[torch.arange(n_rows), torch.randint(2, length // 2, (n_rows,), generator=g)] = SEP
    ends = torch.randint(length - length // 3, length + 1, (n_rows,), generator=g)  # up to 1/3 padding
    positions = torch.arange(length)
    ids[:, -1] = SEP
    is_pad = positions[None, :] >= ends[:, None]
    ids[is_pad] = PAD
    special = torch.isin(ids, torch.tensor(SPECIAL_IDS))
    return ids, special


def run_mask(ids: torch.Tensor, special: torch.Tensor, seed: int = 0, **config: float):
    generator = torch.Generator().manual_seed(seed)
    return mask_tokens(ids, special, MaskingConfig(**config), MASK, RANDOM_IDS, generator)


def test_selection_and_replacement_statistics() -> None:
    ids, special = make_batch()
    masked, labels = run_mask(ids, special)
    selected = labels != -100
    eligible = ~special
    rate = selected.sum().item() / eligible.sum().item()
    assert rate == pytest.approx(0.15, abs=0.01)
    n_selected = selected.sum().item()
    as_mask = (selected & (masked == MASK)).sum().item() / n_selected
    as_random = (selected & (masked >= ORIGINAL_HIGH)).sum().item() / n_selected
    kept = (selected & (masked == ids)).sum().item() / n_selected
    assert as_mask == pytest.approx(0.8, abs=0.02)
    assert as_random == pytest.approx(0.1, abs=0.015)
    assert kept == pytest.approx(0.1, abs=0.015)
    assert as_mask + as_random + kept == pytest.approx(1.0)


def test_specials_and_pads_never_selected_and_labels_exact() -> None:
    ids, special = make_batch()
    masked, labels = run_mask(ids, special)
    selected = labels != -100
    assert not (selected & special).any()
    assert torch.equal(masked[special], ids[special])  # specials and pads pass through untouched
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])  # only selected positions change
    random_positions = selected & (masked != MASK) & (masked != ids)
    assert torch.isin(masked[random_positions], RANDOM_IDS).all()
    assert masked.dtype == ids.dtype == labels.dtype


def test_custom_replacement_fractions() -> None:
    ids, special = make_batch(n_rows=128)
    masked, labels = run_mask(ids, special, mask_rate=0.5, replace_mask=0.0, replace_random=1.0)
    selected = labels != -100
    assert (masked[selected] >= ORIGINAL_HIGH).all()
    masked, labels = run_mask(ids, special, mask_rate=0.5, replace_mask=0.0, replace_random=0.0)
    assert torch.equal(masked, ids)  # selected but all kept: inputs unchanged, labels still set
    assert (labels != -100).any()


def test_every_sequence_with_eligible_tokens_gets_a_target() -> None:
    ids = torch.full((300, 6), PAD)
    ids[:, 0], ids[:, 1], ids[:, 2] = CLS, 42, SEP  # one eligible token per row
    ids[:10, 1] = SEP  # ... except these rows, which have none
    special = torch.isin(ids, torch.tensor(SPECIAL_IDS))
    _, labels = run_mask(ids, special, mask_rate=0.01)
    per_row = (labels != -100).sum(dim=1)
    assert (per_row[:10] == 0).all()
    assert (per_row[10:] == 1).all()
    assert (labels[10:, 1] == 42).all()


def test_forced_selection_is_uniform_over_eligible_positions() -> None:
    ids = torch.randint(7, ORIGINAL_HIGH, (4000, 5))
    special = torch.zeros_like(ids, dtype=torch.bool)
    _, labels = run_mask(ids, special, mask_rate=0.001)
    counts = (labels != -100).sum(dim=0).float()
    assert ((labels != -100).sum(dim=1) >= 1).all()
    assert (counts / counts.sum() - 0.2).abs().max() < 0.03


def test_reproducible_and_dynamic() -> None:
    ids, special = make_batch(n_rows=64)
    first, first_labels = run_mask(ids, special, seed=7)
    again, again_labels = run_mask(ids, special, seed=7)
    assert torch.equal(first, again) and torch.equal(first_labels, again_labels)
    generator = torch.Generator().manual_seed(7)
    config = MaskingConfig()
    one = mask_tokens(ids, special, config, MASK, RANDOM_IDS, generator)[1]
    two = mask_tokens(ids, special, config, MASK, RANDOM_IDS, generator)[1]
    assert not torch.equal(one, two)  # an advancing generator masks the same batch differently
    other_seed = run_mask(ids, special, seed=8)[1]
    assert not torch.equal(first_labels, other_seed)


def test_default_generator_and_bool_like_special_mask() -> None:
    ids, special = make_batch(n_rows=8)
    masked, labels = mask_tokens(ids, special.long(), MaskingConfig(), MASK, RANDOM_IDS)
    assert not ((labels != -100) & special).any()
    assert masked.shape == ids.shape


def test_shape_errors() -> None:
    ids, special = make_batch(n_rows=2)
    with pytest.raises(ValueError, match="same shape"):
        mask_tokens(ids, special[:, :-1], MaskingConfig(), MASK, RANDOM_IDS)
    with pytest.raises(ValueError, match="random_ids"):
        mask_tokens(ids, special, MaskingConfig(), MASK, torch.tensor([], dtype=torch.long))


@pytest.mark.parametrize(
    ("kwargs", "keys"),
    [
        ({"mask_rate": 1.5}, ["task.mask_rate=1.5"]),
        ({"mask_rate": 0}, ["task.mask_rate=0"]),
        ({"mask_rate": 1.0}, ["task.mask_rate=1.0"]),
        ({"mask_rate": True}, ["task.mask_rate=True"]),
        ({"mask_rate": "0.1"}, ["task.mask_rate='0.1'"]),
        ({"replace_mask": -0.1}, ["task.replace_mask=-0.1"]),
        ({"replace_random": 1.2}, ["task.replace_random=1.2"]),
        ({"replace_mask": 0.7, "replace_random": 0.4}, ["task.replace_mask + task.replace_random = 1.1"]),
        (
            {"mask_rate": 2, "replace_mask": 3, "replace_random": -1},
            ["task.mask_rate=2", "task.replace_mask=3", "task.replace_random=-1"],
        ),
    ],
)
def test_config_errors_name_every_key(kwargs: dict, keys: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        MaskingConfig(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert len(info.value.problems) == len(keys)
    for key in keys:
        assert key in message


def test_config_boundaries_accepted() -> None:
    MaskingConfig(mask_rate=0.5, replace_mask=1.0, replace_random=0.0)
    MaskingConfig(mask_rate=0.01, replace_mask=0.0, replace_random=1.0)
    MaskingConfig(mask_rate=0.15, replace_mask=0.7, replace_random=0.3)
