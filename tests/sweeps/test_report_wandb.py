"""The W&B Report of a sweep. Saving one needs W&B online, which tests never are; what can be checked
offline is the report it would save: the sweep's group, the objective and one panel per swept parameter."""

from __future__ import annotations

import pytest

from lmexp.sweeps.report import build_wandb_report


@pytest.mark.slow
def test_the_wandb_report_shows_the_sweeps_group_and_parameters():
    report = build_wandb_report("gpt_lr_width", "lmexp", "team", "val/loss", ["optim.lr", "model.n_embd"])
    assert (report.project, report.entity, report.title) == ("lmexp", "team", "Sweep gpt_lr_width")
    grid = report.blocks[-1]
    [runset] = grid.runsets
    assert "gpt_lr_width" in str(runset.filters) and "Group" in str(runset.filters)
    titles = [panel.title for panel in grid.panels]
    assert titles[:2] == ["val/loss", "train/loss"]
    assert "val/loss vs optim.lr" in titles and "val/loss vs model.n_embd" in titles
    columns = grid.panels[-1].columns
    assert len(columns) == 3  # the two parameters and the objective
