"""Lightning's CSV logger, writing ``metrics.csv`` so that a kill at any moment leaves a whole file behind.

Lightning's writer deletes an existing ``metrics.csv`` when a logger starts and rewrites the file in place
whenever a new column appears; a job killed during either loses rows that a resumed run cannot get back.
Here a rewrite goes to a temporary file that is renamed over the old one, and the first save of a run
replaces the file whole (a resumed run's carried rows included). Rows that add no column are appended,
as Lightning does; a kill in the middle of one leaves a last line without its newline, which
:func:`read_csv_log` (the one reader of these files: resume, reports) drops. A write that fails (full disk,
file-size limit, read-only place) leaves the file as it was and raises one
:class:`~lmexp.errors.StorageError` line.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from lmexp.cache import atomic_path
from lmexp.errors import StorageError, is_storage_failure


class AtomicCSVWriter(ExperimentWriter):
    """``metrics.csv`` replaced whole on the first save and on every header change; appended otherwise."""

    def __init__(self, log_dir: str) -> None:
        self._started = False  # set by the first save, which replaces any file of an earlier run
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if "://" in str(self.metrics_file_path):
            super()._check_log_dir_exists()  # remote storage: Lightning's own writer (deletes the old file)
        # Local: the old file stays until the first save replaces it, so it is never missing.

    def save(self) -> None:
        if not self.metrics:
            return
        if "://" in str(self.metrics_file_path):  # remote storage: Lightning's own writer
            super().save()
            return
        path = Path(self.metrics_file_path)
        new_keys = self._record_new_keys()
        if self._started and path.is_file() and not new_keys:
            _append_rows(path, self.metrics_keys, self.metrics)
        else:
            earlier = read_csv_log(path, numeric_steps=False) if self._started and path.is_file() else []
            with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(earlier + self.metrics)
                handle.flush()
                os.fsync(handle.fileno())
        self._started = True
        self.metrics = []


def _append_rows(path: Path, keys: list[str], rows: list[dict]) -> None:
    """Append ``rows`` to the CSV file; if the write fails (a full disk, a file-size limit), cut the file
    back to its previous end, so what was on disk stays exactly as it was, and say so in one line."""
    size = path.stat().st_size
    try:
        with open(path, "a", newline="", encoding="utf-8") as handle:
            csv.DictWriter(handle, fieldnames=keys).writerows(rows)
    except OSError as error:
        with contextlib.suppress(OSError):  # best effort: a partial last line is dropped by readers anyway
            os.truncate(path, size)
        if is_storage_failure(error):
            raise StorageError(path, error) from error
        raise


def read_csv_log(path: Path, numeric_steps: bool = True) -> list[dict[str, str]]:
    """The rows of a CSV log, without empty cells.

    A last line cut short by a kill is dropped, and (``numeric_steps``) so are rows whose step is not a
    number (a damaged file): the log is read as far as it can be, and whoever reads it goes on.
    """
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = [
        {k: v for k, v in row.items() if k is not None and v not in ("", None)}
        for row in csv.DictReader(io.StringIO(text))
    ]
    return [row for row in rows if _is_number(row.get("step"))] if numeric_steps else rows


def _is_number(text: str | None) -> bool:
    try:
        return text is not None and float(text) == float(text)  # not NaN
    except ValueError:
        return False


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger with :class:`AtomicCSVWriter`; the same arguments and files."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AtomicCSVWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AtomicCSVWriter(log_dir=self.log_dir)
        return self._experiment
