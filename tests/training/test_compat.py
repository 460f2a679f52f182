"""Every private Lightning/torch name in lmexp/training/compat.py, checked against the installed versions.

When a Lightning upgrade moves one, the test of that function fails with a message naming it; fix the one
function in compat.py and nothing else in lmexp changes.
"""

from __future__ import annotations

import lightning
import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lmexp.training import compat

MOVED = "Lightning {version} moved {name}: update lmexp/training/compat.py ({function})"


def moved(name: str, function: str) -> str:
    return MOVED.format(version=lightning.__version__, name=name, function=function)


class Tiny(LightningModule):
    """A one-layer model that logs a value every step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("value", float(batch_idx))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(16, 4))
        return torch.utils.data.DataLoader(data, batch_size=2)


class Probe(Callback):
    """Reads every compat value at the end of each training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(
            (
                trainer.global_step,
                compat.logs_this_step(trainer),
                compat.batches_that_stepped(trainer),
                compat.is_accumulating(trainer),
                compat.pending_log_row(trainer),
            )
        )


@pytest.mark.slow
def test_logging_and_step_internals_of_the_loops(tmp_path):
    probe = Probe()
    trainer = Trainer(
        max_steps=4, accumulate_grad_batches=2, log_every_n_steps=2, logger=False, callbacks=[probe],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    try:
        trainer.fit(Tiny())
    except AttributeError as error:
        pytest.fail(
            moved(str(error), "logs_this_step, batches_that_stepped, is_accumulating, pending_log_row")
        )
    steps = [s[0] for s in probe.seen]
    assert steps == [0, 1, 1, 2, 2, 3, 3, 4], moved("the fit loop's step counting", "batches_that_stepped")
    assert [s[3] for s in probe.seen] == [True, False] * 4, moved("_should_accumulate", "is_accumulating")
    # batches that stepped, before this batch's own step is counted: what Lightning writes as "step"
    assert [s[2] for s in probe.seen] == [0, 0, 1, 1, 2, 2, 3, 3], moved(
        "_batches_that_stepped", "batches_that_stepped"
    )
    logged = [s[1] for s in probe.seen if not s[3]]
    assert logged == [False, True, False, True], moved("should_update_logs", "logs_this_step")
    assert all("value" in s[4] for s in probe.seen), moved(
        'the logger connector\'s "log" metrics', "pending_log_row"
    )


def test_child_launcher_replaces_lightnings_script_launcher(tmp_path):
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, default_root_dir=tmp_path)
    launcher = trainer.strategy.launcher
    for name in ("_call_children_scripts", "_check_can_spawn_children"):
        assert hasattr(launcher, name), moved(f"_SubprocessScriptLauncher.{name}", "ChildScriptLauncher")
    assert compat.replace_child_launcher(trainer.strategy, lambda rank: None), moved(
        "Strategy._launcher", "replace_child_launcher"
    )
    assert compat.child_launcher(trainer.strategy) is trainer.strategy.launcher
    assert trainer.strategy.launcher.num_processes == 2
    one = Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path)
    assert not compat.replace_child_launcher(one.strategy, lambda rank: None)


def test_sharding_group_and_activation_checkpointing():
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size="auto", tensor_parallel_size=1)
    assert hasattr(strategy, "_data_parallel_size"), moved(
        "ModelParallelStrategy._data_parallel_size", "use_one_sharding_group"
    )
    strategy.num_nodes, strategy.parallel_devices = 2, [torch.device("cpu")] * 3
    compat.use_one_sharding_group(strategy)
    assert strategy._data_parallel_size == 6
    checkpoint = compat.composable_activation_checkpointing()
    block = torch.nn.Linear(3, 3)
    names = [name for name, _ in block.named_parameters()]
    checkpoint(block)
    assert [name for name, _ in block.named_parameters()] == names  # names, and so checkpoints, unchanged


def test_wandb_logger_internals(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, id="abc")
    for name in ("_wandb_init", "_experiment", "_id"):
        assert hasattr(logger, name), moved(
            f"WandbLogger.{name}", "drop_wandb_init_argument, restart_wandb_run"
        )
    assert logger._wandb_init.get("anonymous", None) is None
    compat.drop_wandb_init_argument(logger, "anonymous")
    assert "anonymous" not in logger._wandb_init
    compat.restart_wandb_run(logger, new_run=True)
    assert logger._wandb_init["id"] is None and logger._id is None


@pytest.mark.parametrize(
    ("limits", "expected"), [({"max_steps": 5}, "Epoch 16"), ({"max_epochs": 3}, "Epoch 16/2")]
)
def test_progress_bar_title_of_step_bounded_runs(tmp_path, limits, expected):
    bar = compat.RunProgressBar()
    trainer = Trainer(
        callbacks=[bar], logger=False, enable_checkpointing=False, default_root_dir=tmp_path, **limits
    )
    bar.setup(trainer, Tiny(), stage="fit")
    name = "RichProgressBar._get_train_description"
    assert bar._get_train_description(16).strip() == expected, moved(name, "RunProgressBar")


class ValidationProbe(Callback):
    """Compares compat.validates_after_this_batch with the validations that then run."""

    def __init__(self) -> None:
        self.predicted: list[int] = []
        self.validated: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if compat.validates_after_this_batch(trainer):
            self.predicted.append(trainer.global_step)

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validated.append(trainer.global_step)


class TinyWithValidation(Tiny):
    def validation_step(self, batch, batch_idx):
        self.log("val", self.layer(batch[0]).sum())

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(2, 4)))


@pytest.mark.parametrize("interval", [{"val_check_interval": 3, "check_val_every_n_epoch": None}, {}])
def test_validation_prediction_of_the_fit_loop(tmp_path, interval):
    probe = ValidationProbe()
    trainer = Trainer(
        max_steps=10, logger=False, callbacks=[probe], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, **interval,
    )  # fmt: skip
    try:
        trainer.fit(TinyWithValidation())
    except AttributeError as error:
        pytest.fail(moved(str(error), "validates_after_this_batch"))
    assert probe.validated, "the probe saw no validation"
    assert probe.predicted == probe.validated, moved("_should_check_val_fx", "validates_after_this_batch")
