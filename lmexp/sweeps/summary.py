"""The end of a sweep: a summary of every point, the best one, the exit status, and the report.

:class:`SweepCallback` (Hydra's ``hydra.callbacks.sweep`` in conf/train.yaml) reads every point's
``sweep_point.json`` (lmexp/sweeps/point.py) at the end of the sweep, prints a table, writes
``summary.json`` into the sweep dir, writes the report (lmexp/sweeps/report.py) and exits non-zero only if
every point failed.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lmexp.sweeps.point import (
    BUSY,
    FAILED,
    FINISHED,
    PRUNED,
    RUNNING,
    SKIPPED,
    best_record,
    collect_records,
    one_line,
    override_values,
    point_status,
    swept_keys,
)

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"


def print_summary(records: Sequence[dict[str, Any]], sweep_dir: Path, direction: str = "minimize") -> None:
    """A table of every point: status, objective, swept overrides, run dir, error."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    best = best_record(records, direction)
    objective = records[0].get("objective_name", "objective") if records else "objective"
    keys = swept_keys(records)
    table = Table(title=f"lmexp sweep summary ({sweep_dir})", title_justify="left")
    for column in ("#", "status", objective, *keys, "run dir", "error"):
        table.add_column(column, overflow="fold")
    for record in records:
        value, params = record.get("objective"), override_values(record)
        shown = "" if value is None else f"{value:.4f}" + (" (best)" if record is best else "")
        cells = [
            str(record.get("num")),
            point_status(record),
            shown,
            *(params.get(k, "") for k in keys),
            str(record.get("run_dir", "")),
            record.get("error")
            or (f"held by {record['busy']}" if record.get("busy") else "")
            or _pruned_note(record),
        ]
        table.add_row(*(Text(cell) for cell in cells))  # Text: overrides like [a,b] are not rich markup
    statuses = (FINISHED, SKIPPED, PRUNED, FAILED, BUSY, RUNNING)
    counts = {s: sum(point_status(r) == s for r in records) for s in statuses}
    console = Console(width=max(160, Console().width), highlight=False)
    console.print(table)
    line = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    if best:
        line += f"; best: point {best['num']} {objective}={best['objective']:.4f} ({best['run_dir']})"
    console.print(Text(f"sweep: {line}"))


def _pruned_note(record: dict[str, Any]) -> str:
    """Where a pruned point stopped (its objective column shows the value it was pruned at)."""
    return f"pruned at step {record.get('pruned_at_step')}" if record.get("status") == PRUNED else ""


class SweepCallback(Callback):
    """Hydra callback: at the end of a sweep, a summary of every point, and the exit status.

    The sweep exits non-zero only if every point it ran failed. ``report``: also write the sweep
    report (``lmexp.report``) into the sweep dir.
    """

    def __init__(self, report: bool = True, direction: str = "minimize") -> None:
        self.report = report
        self.direction = direction
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from lmexp.cli import exit_on_error
        from lmexp.config.schema import parse
        from lmexp.config.settings import SweepOptions

        self.started = time.time()
        with exit_on_error():  # sweep.name makes the sweep dir, which Hydra creates right after this
            parse(SweepOptions, config.get("sweep") or {}, "sweep")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from lmexp.cache import atomic_write_json

        sweep_dir = Path(str(config.hydra.sweep.dir))
        records = collect_records(sweep_dir)
        print_summary(records, sweep_dir, self.direction)
        best = best_record(records, self.direction)
        atomic_write_json(sweep_dir / SUMMARY_NAME, {"points": records, "best": best and best["num"]})
        if self.report and records:
            self._write_report(sweep_dir)
        this_run = [r for r in records if r.get("updated", 0) >= self.started] or records
        if this_run and all(r.get("status") == FAILED for r in this_run):
            print(f"error: all {len(this_run)} points of the sweep failed", file=sys.stderr, flush=True)
            raise SystemExit(1)

    def _write_report(self, sweep_dir: Path) -> None:
        from lmexp.sweeps.report import write_report

        try:
            written = write_report(sweep_dir, direction=self.direction)
            print(f"report: {written['md']}", flush=True)
        except Exception as error:  # noqa: BLE001 - the sweep's results matter more than its report
            log.warning(f"sweep report not written: {one_line(error)}")
