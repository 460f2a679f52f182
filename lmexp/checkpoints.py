"""Reading lmexp checkpoints safely: one place that loads, verifies and explains a bad file.

Every tool that reads a checkpoint (resume, fine-tuning's ``init_from``, eval, generate, export) goes
through :func:`load_checkpoint`, so a truncated, foreign or missing file gives the same one clear line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmexp.errors import CheckpointError


def load_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """Load the lmexp checkpoint at ``path`` on the CPU with ``weights_only=True``.

    ``key`` is the config key the path came from, named in the error message.
    Raises :class:`CheckpointError` for a missing, truncated, foreign or unsafe file.
    """
    import torch

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
    ``.metadata``) and Lightning's ``meta.pt`` (step, loops, lmexp's run info). The shards are gathered
    into full CPU tensors in this one process, so the result has the same layout as a ``.ckpt`` file:
    ``state_dict`` with full tensors, ``lmexp``, ``global_step``... (optimizer states as ``optimizer_0``).
    """
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path).expanduser()
    if not (path / SHARDED_METADATA).is_file() or not (path / ".metadata").is_file():
        raise CheckpointError(
            f"{key}={path} is a directory but not a sharded checkpoint (expected {SHARDED_METADATA}, "
            ".metadata and *.distcp shards from a trainer=fsdp run)"
        )
    try:
        checkpoint = torch.load(path / SHARDED_METADATA, map_location="cpu", weights_only=True)
        tensors: dict[str, Any] = {}
        _load_state_dict(
            tensors,
            storage_reader=FileSystemReader(path),
            planner=_EmptyStateDictLoadPlanner(),
            no_dist=True,
        )
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
        checkpoint_dir.glob("*.ckpt"), key=lambda p: (p.name == "last.ckpt", p.stat().st_mtime), reverse=True
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
    checkpoint: dict[str, Any], path: Path, model_config: dict[str, Any], tokenizer_bytes: bytes
) -> None:
    """Refuse to resume from a checkpoint whose model or tokenizer differs from this run's."""
    extras = checkpoint.get("lmexp", {})
    saved = extras.get("model_config")
    if saved is not None and saved != model_config:
        changed = sorted(k for k in set(saved) | set(model_config) if saved.get(k) != model_config.get(k))
        details = ", ".join(
            f"model.{k}: {saved.get(k)!r} there, {model_config.get(k)!r} now" for k in changed
        )
        raise CheckpointError(f"ckpt_path={path} was trained with a different model ({details})")
    saved_tokenizer = extras.get("tokenizer_model")
    if saved_tokenizer is not None and bytes(saved_tokenizer.numpy().tobytes()) != tokenizer_bytes:
        raise CheckpointError(
            f"ckpt_path={path} was trained with a different tokenizer than this run's (tokenizer.* or data.* "
            "differ); resume with the config of the run that wrote it"
        )
