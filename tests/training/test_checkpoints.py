"""RunCheckpoint's schedule of last.ckpt, against Lightning's resume rules (lmexp/training/checkpoints.py)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lmexp.training.checkpoints import RunCheckpoint


class Tiny(LightningModule):
    """A one-layer model with a validation split."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def _loader(self, n: int) -> torch.utils.data.DataLoader:
        generator = torch.Generator().manual_seed(n)
        data = torch.utils.data.TensorDataset(torch.randn(n, 4, generator=generator))
        return torch.utils.data.DataLoader(data)

    def train_dataloader(self):
        return self._loader(64)

    def val_dataloader(self):
        return self._loader(2)


class CrashAtValidation(Callback):
    """Records the steps validation ran at; raises when validation starts at step ``crash_at`` (a kill
    during that validation: nothing after its start is saved)."""

    def __init__(self, crash_at: int | None) -> None:
        self.crash_at = crash_at
        self.validated_at: list[int] = []

    def on_validation_start(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        if trainer.global_step == self.crash_at:
            raise RuntimeError("killed during validation")
        self.validated_at.append(trainer.global_step)


def fit(tmp_path, crash_at: int | None, resume: bool) -> list[int]:
    watcher = CrashAtValidation(crash_at)
    checkpoint = RunCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val/loss", every_n_train_steps=2)
    trainer = Trainer(
        max_steps=8, val_check_interval=4, check_val_every_n_epoch=None, logger=False,
        callbacks=[checkpoint, watcher], enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=tmp_path,
    )  # fmt: skip
    ckpt_path = str(tmp_path / "checkpoints" / "last.ckpt") if resume else None
    try:
        trainer.fit(Tiny(), ckpt_path=ckpt_path)
    except RuntimeError as error:
        assert "killed during validation" in str(error)
    return watcher.validated_at


@pytest.mark.slow
def test_a_run_killed_during_validation_resumes_into_that_validation(tmp_path):
    """last.ckpt is due at step 4 (every 2 steps) and a validation runs after step 4: written before the
    validation, a resumed run would skip it (Lightning fast-forwards the validation of a run restarted at
    the end of a training batch), so it is written after it; the run killed there resumes from step 2 and
    validates at step 4."""
    assert fit(tmp_path / "whole", crash_at=None, resume=False) == [4, 8]
    assert fit(tmp_path / "killed", crash_at=4, resume=False) == []
    step = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert step == 2
    assert fit(tmp_path / "killed", crash_at=None, resume=True) == [4, 8]
