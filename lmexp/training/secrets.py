"""Keep credentials out of everything a run writes.

A value from an environment variable that holds a credential (``WANDB_API_KEY``, any ``*_KEY``,
``*_TOKEN``, ``*_SECRET`` or ``*PASSWORD``) can reach a run's files through the config, for example as
``${oc.env:HF_TOKEN}``. :func:`redact` masks such values wherever they occur in a config or text before it
is saved to a checkpoint, a logger or a report.
"""

from __future__ import annotations

import os
import re
from typing import Any

SECRET_NAME = re.compile(r"(^|_)(API_KEY|KEY|TOKEN|SECRET|PASSWORD|PASSWD)$", re.IGNORECASE)
MASK = "***"
MIN_SECRET_LENGTH = 6  # shorter values ("1", "true") would mask innocent text


def secret_values() -> list[str]:
    """Values of the credential-like environment variables, longest first."""
    values = {v for name, v in os.environ.items() if SECRET_NAME.search(name) and len(v) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """``obj`` (str, or dicts and lists of them) with every secret value replaced by ``***``."""
    secrets = secret_values() if secrets is None else secrets
    if not secrets:
        return obj
    if isinstance(obj, str):
        for secret in secrets:
            obj = obj.replace(secret, MASK)
        return obj
    if isinstance(obj, dict):
        return {key: redact(value, secrets) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(value, secrets) for value in obj)
    return obj
