"""Every shipped config composes and passes the checks that run before any data work."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmexp.builders import check_config
from lmexp.cli import config_dir

GROUPS = [
    "model",
    "task",
    "data",
    "tokenizer",
    "trainer",
    "optim",
    "scheduler",
    "logger",
    "experiment",
    "debug",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


CASES = [(group, option) for group in GROUPS for option in options(group)]


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_and_checks(group, option, config, tmp_path):
    # Composed on top of the shipped defaults (not the tiny test settings), plus what the option needs.
    labelled = ["data.train_path=train.jsonl", "data.val_path=val.jsonl"]
    needs = {
        ("data", "text"): ["data.path=corpus.txt"],
        ("task", "mlm"): ["model=bert"],
        ("task", "classify"): ["data=jsonl", *labelled],
        ("task", "ner"): ["data=jsonl", *labelled],
        ("data", "jsonl"): ["task=classify", *labelled],
        ("data", "conll"): ["task=ner", *labelled],
    }
    cfg = config(f"{group}={option}", *needs.get((group, option), []), tiny=False)
    check_config(cfg)


def test_gpt2_small_preset_has_124m_parameters(config):
    import torch

    from lmexp.builders import build_config_object

    cfg = config("model=gpt2-small", "data.block_size=1024", tiny=False)
    model_config = build_config_object(cfg.model, "model", vocab_size=50257)
    with torch.device("meta"):
        model = model_config.build()
    assert model_config.max_seq_len == 1024
    assert 124e6 < sum(p.numel() for p in model.parameters()) < 125e6
