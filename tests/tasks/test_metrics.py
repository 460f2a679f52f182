"""Bits per byte for every language model, bits per word only where words mean something."""

from __future__ import annotations

import math

import pytest
import torch

from lmexp.tasks.metrics import IGNORE_INDEX, LanguageModelMetrics, words_are_meaningful


def test_bpb_is_summed_nll_in_bits_over_bytes() -> None:
    metrics = LanguageModelMetrics(vocab_size=10)
    labels = torch.tensor([[1, 2, 3, IGNORE_INDEX]])
    predictions = torch.tensor([1, 0, 3, 0])
    metrics.update(predictions, labels, torch.tensor(6.0), torch.tensor([2]), torch.tensor([12]))
    metrics.update(predictions, labels, torch.tensor(3.0), torch.tensor([1]), torch.tensor([6]))
    values = metrics.compute()
    assert values["loss"].item() == pytest.approx(9.0 / 6)
    assert values["bpb"].item() == pytest.approx(9.0 / math.log(2) / 18)
    assert values["bpw"].item() == pytest.approx(9.0 / math.log(2) / 3)
    assert values["tokens"].item() == 6


def test_no_bpw_for_text_without_spaces() -> None:
    metrics = LanguageModelMetrics(vocab_size=10)
    labels = torch.tensor([[1, 2]])
    # One "word" (a line of Chinese) of 60 bytes: a word is a whole line there.
    metrics.update(torch.tensor([1, 2]), labels, torch.tensor(5.0), torch.tensor([1]), torch.tensor([60]))
    values = metrics.compute()
    assert "bpb" in values and "bpw" not in values


def test_words_are_meaningful() -> None:
    assert words_are_meaningful(600, 100)  # English: about 6 bytes per word
    assert not words_are_meaningful(3000, 20)  # Chinese lines
    assert words_are_meaningful(0, 5)  # no byte count: words alone decide
    assert not words_are_meaningful(100, 0)
