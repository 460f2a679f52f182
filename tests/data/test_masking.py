"""Tests for dynamic MLM masking (lmexp.data.masking)."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.utils.data import DataLoader

from lmexp.data.masking import MaskingConfig, MLMCollator, mask_tokens
from lmexp.errors import ConfigError

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


class _Examples(torch.utils.data.Dataset):
    """Pair-shaped examples: ``[CLS] tokens [SEP] tokens [SEP] pad ...`` with NSP labels."""

    def __init__(self, n: int = 64, length: int = 32, identical: bool = False) -> None:
        ids, _ = make_batch(n, length, seed=3)
        self.ids = ids[:1].repeat(n, 1) if identical else ids
        self.mask = (ids != PAD).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "token_type_ids": torch.zeros_like(self.ids[i]),
            "attention_mask": self.mask[i],
            "nsp_label": torch.tensor(i % 2),
        }


def make_collator(seed: int = 0) -> MLMCollator:
    return MLMCollator([PAD, 1, 2, 3, CLS, SEP], MASK, ORIGINAL_HIGH, MaskingConfig(mask_rate=0.3), seed=seed)


def test_collator_stacks_and_masks() -> None:
    data = _Examples()
    collator = make_collator()
    batch = collator([data[i] for i in range(8)])
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "nsp_label", "labels"}
    assert batch["nsp_label"].tolist() == [i % 2 for i in range(8)]
    original = data.ids[:8]
    selected = batch["labels"] != -100
    assert torch.equal(batch["labels"][selected], original[selected])
    assert not (selected & (batch["attention_mask"] == 0)).any()
    never = torch.isin(original, torch.tensor(SPECIAL_IDS))  # mask_id counts as special too
    assert not (selected & never).any()
    random_positions = selected & (batch["input_ids"] != MASK) & (batch["input_ids"] != original)
    assert not torch.isin(batch["input_ids"][random_positions], torch.tensor(SPECIAL_IDS)).any()
    assert (batch["input_ids"] < ORIGINAL_HIGH).all()  # random ids stay inside the vocabulary


def test_collator_seeded_and_dynamic() -> None:
    data = _Examples()
    examples = [data[i] for i in range(16)]
    a, b = make_collator(seed=1), make_collator(seed=1)
    first = a(examples)["labels"]
    assert torch.equal(first, b(examples)["labels"])
    assert not torch.equal(first, a(examples)["labels"])  # the next epoch masks anew
    assert not torch.equal(first, make_collator(seed=2)(examples)["labels"])
    restored = pickle.loads(pickle.dumps(make_collator(seed=1)))
    assert torch.equal(first, restored(examples)["labels"])


def test_collator_rejects_bad_ids() -> None:
    with pytest.raises(ValueError, match="outside"):
        MLMCollator([PAD, 2000], MASK, ORIGINAL_HIGH, MaskingConfig())
    with pytest.raises(ValueError, match="special"):
        MLMCollator(range(9), MASK, 8, MaskingConfig())


def _epoch_labels(loader: DataLoader) -> torch.Tensor:
    return torch.cat([batch["labels"] for batch in loader])


def test_collator_in_workers_reproducible_and_new_each_epoch() -> None:
    def loader() -> DataLoader:
        return DataLoader(
            _Examples(identical=True),
            batch_size=8,
            num_workers=2,
            collate_fn=make_collator(seed=5),
            generator=torch.Generator().manual_seed(11),
        )

    first = loader()
    epoch_1, epoch_2 = _epoch_labels(first), _epoch_labels(first)
    assert not torch.equal(epoch_1, epoch_2)
    assert torch.equal(epoch_1, _epoch_labels(loader()))
    # Rows are identical, and batches 0 and 1 come from different workers, which must not mask alike.
    assert not torch.equal(epoch_1[:8], epoch_1[8:16])
