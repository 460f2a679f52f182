"""Checkpoints: written atomically on schedule, read safely, found in a run dir, checked against the run.

Writing: :class:`AtomicCheckpointIO` (Lightning's checkpoint I/O plug-in) and :class:`RunCheckpoint`
(``callbacks.checkpoint``: Lightning's ModelCheckpoint for the best file, ``last.ckpt`` on its own schedule).
Reading: every tool that reads a checkpoint (resume, fine-tuning's ``init_from``, eval, generate, export)
goes through :func:`load_checkpoint`, so a truncated, foreign or missing file gives the same one clear line,
and through :func:`checkpoint_of` for "a run dir stands for its last checkpoint".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from lmexp.cache import atomic_path
from lmexp.errors import CheckpointError
from lmexp.training.compat import validates_after_this_batch

LAST = "last.ckpt"


# -------------------------------------------------------------------------------------------- writing
class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file next to the target, ``fsync``, then rename over it.

    Lightning's own writer stages the file in the system temp dir and moves it into place; when that dir is
    on another filesystem (a node-local /tmp, checkpoints on shared storage) the move is a copy, and a job
    killed during it leaves a truncated checkpoint. A rename within one directory is atomic: a reader sees
    the old file or the new one, never half of one.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's transaction is what exists there
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as handle:
            writer = _FailureKeepingWriter(handle)
            try:
                torch.save(checkpoint, writer)
            except RuntimeError as error:
                if writer.failure is None:
                    raise
                # torch reports a failed write (full disk, size limit) as "unexpected pos": the OSError
                # itself says why, and atomic_path turns it into one line naming the checkpoint.
                raise writer.failure from error
            handle.flush()
            os.fsync(handle.fileno())

    def load_checkpoint(self, path: Any, *args: Any, weights_only: bool | None = None, **kwargs: Any) -> Any:
        # lmexp writes only tensors and plain data, so resuming never needs to unpickle arbitrary objects.
        weights_only = True if weights_only is None else weights_only
        return super().load_checkpoint(path, *args, weights_only=weights_only, **kwargs)


class _FailureKeepingWriter:
    """The file object torch.save writes to, keeping the OSError of a failed write (torch's C++ writer
    replaces it with a RuntimeError that no longer says why)."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.failure = handle, None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.failure = error
            raise

    def flush(self) -> None:
        try:
            self.handle.flush()
        except OSError as error:
            self.failure = error
            raise


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint for the best checkpoint by ``monitor``, and ``last.ckpt`` on a schedule of
    its own.

    ModelCheckpoint postpones a save that ``every_n_train_steps`` asks for until the monitored metric
    (``val/loss``) exists, ``last.ckpt`` included: with validation every 5,000 steps and checkpoints every
    500, a job killed at step 4,900 would have nothing to resume from. Here ``last.ckpt`` is written by
    ``trainer.save_checkpoint`` every ``every_n_train_steps`` steps (after the validation, when one follows
    that step), after every validation, and at the end of training when steps ran after its newest save; only
    the best-by-metric file waits for the metric. The arguments are ModelCheckpoint's.
    """

    def __init__(self, *args: Any, save_last: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, save_last=False, **kwargs)
        self.keeps_last = bool(save_last)
        self.every_n_steps = int(kwargs.get("every_n_train_steps") or 0)
        self._last_written_step: int | None = None

    @property
    def last_path(self) -> Path | None:
        """Where ``last.ckpt`` goes (None when this callback keeps none)."""
        return Path(self.dirpath) / LAST if self.keeps_last and self.dirpath else None

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.every_n_steps >= 1 and trainer.global_step % self.every_n_steps == 0:
            # A validation right after this batch writes last.ckpt when it ends: written here, a run
            # killed during that validation would resume past it and never log it.
            if not validates_after_this_batch(trainer):
                self.write_last(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_validation_end(trainer, pl_module)
        self.write_last(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.write_last(trainer)
        super().on_train_end(trainer, pl_module)

    def write_last(self, trainer: Any) -> None:
        """Write ``last.ckpt`` for the current step, unless it holds this step already (every rank calls
        this: a sharded save is a collective)."""
        if self.last_path is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if self._last_written_step == trainer.global_step:
            return
        trainer.save_checkpoint(self.last_path, weights_only=self.save_weights_only)
        self._last_written_step = trainer.global_step


def last_checkpoint_path(trainer: Any) -> Path | None:
    """Where the run's ``last.ckpt`` is written (None when no callback keeps one)."""
    for callback in trainer.callbacks:
        if isinstance(callback, RunCheckpoint) and callback.last_path is not None:
            return callback.last_path
    return None


# -------------------------------------------------------------------------------------------- reading
def checkpoint_of(path: str | Path) -> Path:
    """A checkpoint path as the user gave it: a run dir (one with ``checkpoints/``) stands for its
    ``last.ckpt``; anything else is taken as it is."""
    path = Path(str(path)).expanduser()
    return path / "checkpoints" / LAST if (path / "checkpoints").is_dir() else path


def load_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """Load the lmexp checkpoint at ``path`` on the CPU with ``weights_only=True``.

    ``key`` is the config key the path came from, named in the error message.
    Raises :class:`CheckpointError` for a missing, truncated, foreign or unsafe file.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return load_sharded_checkpoint(path, key)
    if not path.is_file():
        raise CheckpointError(f"{key}={path}: no such checkpoint file; expected a .ckpt from a run dir")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for damaged files
        if "Weights only load failed" in str(error):
            raise CheckpointError(
                f"{key}={path} is not an lmexp checkpoint (it holds objects other than tensors and "
                "plain data, which lmexp never writes)"
            ) from None
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise CheckpointError(
            f"{key}={path} is not a readable checkpoint (truncated or not a PyTorch file: {reason[:120]})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "lmexp" not in checkpoint:
        raise CheckpointError(f"{key}={path} is not an lmexp checkpoint (no model state or run info)")
    return checkpoint


SHARDED_METADATA = "meta.pt"  # what Lightning writes next to the shards: everything but the tensors


def load_sharded_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """Load a sharded checkpoint (a directory written by ``trainer=fsdp``) as one full checkpoint.

    Such a directory holds torch distributed-checkpoint shards (``*.distcp``, one per rank, and
    ``.metadata``) and Lightning's ``meta.pt`` (step, loops, lmexp's run info). torch's
    ``dcp_to_torch_save`` gathers the shards into full CPU tensors in this one process, so the result has
    the same layout as a ``.ckpt`` file: ``state_dict`` with full tensors, ``lmexp``, ``global_step``...
    (optimizer states as ``optimizer_0``).
    """
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(path).expanduser()
    if not (path / SHARDED_METADATA).is_file() or not (path / ".metadata").is_file():
        raise CheckpointError(
            f"{key}={path} is a directory but not a sharded checkpoint (expected {SHARDED_METADATA}, "
            ".metadata and *.distcp shards from a trainer=fsdp run)"
        )
    try:
        checkpoint = torch.load(path / SHARDED_METADATA, map_location="cpu", weights_only=True)
        with tempfile.TemporaryDirectory(prefix="lmexp-dcp-") as scratch:
            gathered = Path(scratch) / "full.pt"
            dcp_to_torch_save(path, gathered)
            tensors = torch.load(gathered, map_location="cpu", weights_only=True)
    except Exception as error:  # damaged or missing shards, a foreign meta.pt
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{key}={path} is not a readable sharded checkpoint ({reason[:120]})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in tensors or "lmexp" not in checkpoint:
        raise CheckpointError(f"{key}={path} is not an lmexp checkpoint (no model state or run info)")
    checkpoint.update(tensors)
    return checkpoint


def checkpoint_step(checkpoint: dict[str, Any]) -> int:
    """The optimizer step a loaded checkpoint was saved at."""
    return int(checkpoint.get("global_step", 0))


def newest_good_checkpoint(checkpoint_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint in ``checkpoint_dir`` that loads, and one line per unreadable one skipped.

    ``last.ckpt`` is tried first, then the others newest first. Used by ``resume=auto``: a checkpoint
    damaged by a crash falls back to the previous good one, and the deterministic replay from there ends
    at the same weights.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None, []
    candidates = sorted(
        checkpoint_dir.glob("*.ckpt"), key=lambda p: (p.name == LAST, p.stat().st_mtime), reverse=True
    )
    skipped = []
    for path in candidates:
        try:
            load_checkpoint(path, key="resume")
        except CheckpointError as error:
            skipped.append(str(error))
            continue
        return path, skipped
    return None, skipped


def remove_stale_temporaries(checkpoint_dir: Path) -> None:
    """Delete temporary files a killed writer left behind (``.<name>.<random>.tmp``)."""
    for tmp in Path(checkpoint_dir).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def check_resumable(
    checkpoint: dict[str, Any], path: Path, extras: dict[str, Any], tokenizer_files: dict[str, bytes]
) -> None:
    """Refuse to resume from a checkpoint whose model, LoRA base or tokenizer differs from this run's.

    ``extras``: this run's ``task.checkpoint_extras``; ``tokenizer_files``: its tokenizer as
    ``{file name: bytes}`` (lmexp/data/tokenizer_store.py).
    """
    from lmexp.data.tokenizer_store import saved_tokenizer

    saved_extras = checkpoint.get("lmexp", {})
    saved, model_config = saved_extras.get("model_config"), extras["model_config"]
    # A key the saved config lacks is one lmexp added later (lora): the run that wrote it had its default.
    changed = sorted(k for k in saved or {} if saved.get(k) != model_config.get(k))
    if changed:
        details = ", ".join(
            f"model.{k}: {saved.get(k)!r} there, {model_config.get(k)!r} now" for k in changed
        )
        raise CheckpointError(f"ckpt_path={path} was trained with a different model ({details})")
    if saved_extras.get("lora_base") != extras.get("lora_base"):
        raise CheckpointError(
            f"ckpt_path={path} holds LoRA adapters of another base model ({saved_extras.get('lora_base')} "
            f"there, {extras.get('lora_base')} now); resume with the init_from or model.name_or_path it was "
            "trained on"
        )
    saved_tokenizer_files = saved_tokenizer(saved_extras)
    if saved_tokenizer_files and saved_tokenizer_files != tokenizer_files:
        raise CheckpointError(
            f"ckpt_path={path} was trained with a different tokenizer than this run's (tokenizer.* or data.* "
            "differ); resume with the config of the run that wrote it"
        )


def checkpoint_fingerprint(path: Path) -> str:
    """A digest of a checkpoint's contents (a file, or a sharded checkpoint's directory): what a LoRA run
    records of the ``init_from`` checkpoint its adapters sit on."""
    from lmexp.cache import files_digest

    return files_digest([Path(path)])
