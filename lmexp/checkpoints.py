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
