"""Every shipped config composes and passes the checks that run before any data work; so does every sweep."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmexp.config.compose import config_dir
from lmexp.config.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
GROUPS = ["model", "task", "data", "tokenizer", "trainer", "optim", "scheduler", "logger"]
GROUPS += ["experiment", "debug"]
LABELLED = ["data.train_path=train.jsonl", "data.val_path=val.jsonl"]
# What an option needs beside the shipped defaults to make a valid run.
NEEDS = {
    ("data", "text"): ["data.path=corpus.txt"],
    ("data", "hf"): ["data.hf.path=json", "data.hf.data_files=corpus.jsonl"],
    ("data", "mixture"): ["data.sources.text.path=corpus.txt"],
    ("task", "mlm"): ["model=bert"],
    ("task", "classify"): ["data=jsonl", *LABELLED],
    ("task", "ner"): ["data=jsonl", *LABELLED],
    ("data", "jsonl"): ["task=classify", *LABELLED],
    ("data", "conll"): ["task=ner", *LABELLED],
    # Nothing of the model is read while the settings are checked (a typo is reported before any download).
    ("model", "hf"): ["model.name_or_path=not/read-yet"],
    ("task", "qa"): ["model=bert", "data=squad", *LABELLED],
    ("data", "squad"): ["model=bert", "task=qa", *LABELLED],
    ("task", "sft"): ["data=sft", *LABELLED],
    ("data", "sft"): ["task=sft", *LABELLED],
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


CASES = [(group, option) for group in GROUPS for option in options(group)]


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_and_checks(group, option, config):
    # Composed on top of the shipped defaults (not the tiny test settings), plus what the option needs.
    load_settings(config(f"{group}={option}", *NEEDS.get((group, option), []), tiny=False))


SWEEPS = sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml"))
SWEEP_NEEDS = {"finetune_lr_seed": ["init_from=null", "data.train_path=t.jsonl", "data.val_path=v.jsonl"]}


@pytest.mark.slow
@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_shipped_sweep_plans(sweep, capsys):
    from lmexp.sweeps.plan import plan

    points = plan(["-m", f"+sweep={sweep}", *SWEEP_NEEDS.get(sweep, [])])
    assert points and all(point.ok for point in points)


def test_gpt2_small_preset_has_124m_parameters(config):
    import torch

    from lmexp.config.settings import group

    cfg = config("model=gpt2-small", "data.block_size=1024", tiny=False)
    model_config = group(cfg, "model", vocab_size=50257)
    with torch.device("meta"):
        model = model_config.build()
    assert model_config.max_seq_len == 1024
    assert 124e6 < sum(p.numel() for p in model.parameters()) < 125e6
