"""HarnessCallback: harness metrics logged during a real Lightning fit, without changing the training."""

from __future__ import annotations

import csv
import json

import pytest

from lmexp.errors import ConfigError
from lmexp.inference.agreement import agreement_examples, write_agreement_task
from lmexp.inference.harness_callback import HarnessCallback
from lmexp.train import train


def test_settings_are_checked():
    with pytest.raises(
        ConfigError, match="callbacks.harness.every_n_train_steps=0: expected an integer >= 1"
    ):
        HarnessCallback(tasks=["x"], every_n_train_steps=0)
    with pytest.raises(
        ConfigError, match="callbacks.harness.tasks='hellaswag': expected a list of task names"
    ):
        HarnessCallback(tasks="hellaswag", every_n_train_steps=5)
    assert HarnessCallback(tasks=None, every_n_train_steps=5).tasks == []  # off


class _Trainer:
    """Only what the callback reads when it is off."""

    global_step = 5
    is_global_zero = True


def test_without_tasks_the_callback_does_nothing():
    callback = HarnessCallback(tasks=[], every_n_train_steps=5)
    callback.setup(_Trainer(), None, "fit")  # would index tasks (and fail without a model) if it were on
    callback.on_train_batch_end(_Trainer(), None, None, None, 0)
    assert callback.history == {}


@pytest.mark.slow  # two short training runs
def test_harness_every_n_steps_in_a_fit_leaves_training_unchanged(config, grammar, tmp_path):
    tasks = tmp_path / "tasks"
    write_agreement_task(
        tasks, agreement_examples(grammar, 8, seed=0), datasets_cache_dir=tmp_path / "datasets"
    )
    # Dropout on: a model left in eval mode, or a random state left seeded by the harness, would change
    # every step after the first evaluation.
    common = ["trainer.max_steps=10", "model.dropout=0.1", "trainer.val_check_interval=10"]
    harness = [  # the entry of conf/callbacks/default.yaml, off until it has tasks
        "callbacks.harness.tasks=[lmexp_agreement]",
        "callbacks.harness.every_n_train_steps=4",
        f"callbacks.harness.include_path={tasks}",
        "callbacks.harness.limit=6",
    ]
    plain = train(config(*common, run_dir=tmp_path / "plain"))
    with_harness = train(config(*common, *harness, run_dir=tmp_path / "harness"))
    assert with_harness["val/loss"] == plain["val/loss"]

    with open(tmp_path / "harness" / "csv" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("harness/lmexp_agreement/acc")]
    assert [int(row["step"]) for row in rows] == [4, 8]
    assert all(0 <= float(row["harness/lmexp_agreement/acc"]) <= 1 for row in rows)
    assert all(row["harness/lmexp_agreement/acc_norm"] for row in rows)
    # metrics.json holds the latest evaluation's values
    saved = json.loads((tmp_path / "harness" / "metrics.json").read_text())
    assert saved["harness/lmexp_agreement/acc"] == pytest.approx(
        float(rows[-1]["harness/lmexp_agreement/acc"])
    )
