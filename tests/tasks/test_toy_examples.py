"""The README's classification and token-classification examples, run as written on the toy data.

The commands are read from README.md (so the test breaks when they do), the pre-trained run is the tiny
bert of tests/tasks/helpers.py, and a few overrides shorten the runs.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from tests.tasks.helpers import pretrained_checkpoint

README = Path(__file__).resolve().parents[2] / "README.md"
SHORT = [
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.max_steps=60",
    "trainer.val_check_interval=30",
    "trainer.log_every_n_steps=10",
    "scheduler.warmup_steps=4",
    "optim.lr=3e-3",
    "data.batch_size=16",
    "data.block_size=64",  # the tiny pre-trained bert's positions
]


def readme_command(heading: str, needle: str) -> list[str]:
    """The arguments after ``python -m`` of the command under ``heading`` that contains ``needle``."""
    section = README.read_text(encoding="utf-8").split(heading, 1)[1].split("\n### ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    (line,) = [line for line in block.splitlines() if needle in line]
    words = shlex.split(line.split("  #", 1)[0])
    assert words[:2] == ["python", "-m"], line
    return words[2:]


@pytest.fixture(scope="module")
def bert(tmp_path_factory, cache_dir) -> Path:
    """A few-step bert pre-training run (shared with the other fine-tuning tests of the session)."""
    return pretrained_checkpoint("bert", tmp_path_factory.getbasetemp() / "pretrained", cache_dir)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("heading", "task", "floor"),
    [
        ("### Classification", "classify", 0.25),  # four balanced topics
        ("### Token classification", "ner", 0.56),  # the share of O tags in the val split
    ],
)
def test_readme_example_learns_the_toy_task(heading, task, floor, bert, cli, tmp_path):
    toy = readme_command("## Fine-tuning", "lmexp.data.toy_tasks")
    made = cli(*toy)
    assert made.returncode == 0, made.stderr[-2000:]
    command = [
        f"init_from={bert}" if word.startswith("init_from=") else word
        for word in readme_command(heading, f"task={task}")
    ]
    assert any(word.startswith("init_from=") for word in command)
    run = tmp_path / "run"
    trained = cli(*command, *SHORT, f"hydra.run.dir={run}", timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val/acc"] > floor + 0.15, metrics
    assert metrics["test/acc"] > floor, metrics
