"""``python -m lmexp.report <sweep dir> [report.key=value ...]``: one report of every point of a sweep.

Reads each point's overrides (``.hydra/overrides.yaml``), config (``.hydra/config.yaml``), metrics
(``metrics.json``), learning curves (``csv/metrics.csv``) and sweep record (``sweep_point.json``), and
writes into the sweep dir:

* ``report.csv``: one row per point: status, objective, swept parameters, every metric, the flat config;
* ``report.md`` and ``report.html``: the table with the best point marked, and the plots;
* ``plots/learning_curves.png`` (every point's training and objective curves) and
  ``plots/objective_vs_<parameter>.png`` for each swept parameter.

With ``report.wandb=true`` and W&B online it also saves a W&B Report of the sweep's runs (its group).
Options: ``conf/report.yaml``.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lmexp.config import overrides as override_strings
from lmexp.errors import UserError
from lmexp.sweeps.point import FAILED, FINISHED, PRUNED, best_of, read_record, swept_keys
from lmexp.sweeps.scaling_report import is_ladder_sweep, scaling_section, summary_line

HEADLINE_METRICS = ("val/loss", "val/ppl", "val/acc", "val/bpw", "test/loss", "perf/tokens_per_sec")


@dataclass
class Point:
    """One point of a sweep, as read back from its run dir."""

    num: int
    run_dir: Path
    status: str
    overrides: list[str]
    config: dict[str, Any]
    metrics: dict[str, float]
    objective: float | None = None
    error: str = ""
    sweep_name: str | None = None  # as the point resolved it: the W&B group of its run
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def record(self) -> dict[str, Any]:
        """The fields :func:`lmexp.sweeps.point.swept_keys` reads."""
        return {"overrides": self.overrides}


# ------------------------------------------------------------------------------------------- reading
def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat |= _flatten(value, f"{prefix}{key}.")
        return flat
    return {prefix.rstrip("."): node}


def _read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from the CSV logger's file (empty when there is none)."""
    from lmexp.training.csv_log import read_csv_log

    curves: dict[str, list[tuple[int, float]]] = {}
    for row in read_csv_log(run_dir / "csv" / "metrics.csv"):
        for name, value in row.items():
            if name not in ("step", "epoch"):
                curves.setdefault(name, []).append((int(float(row["step"])), float(value)))
    return curves


def _point_dirs(sweep_dir: Path) -> list[Path]:
    dirs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/config.yaml")]
    return sorted(dirs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))


def load_point(run_dir: Path, objective: str) -> Point:
    """Read one point's files; a point without a record is finished when it has metrics.json."""
    record = read_record(run_dir) or {}
    overrides = [str(o) for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")]
    config = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=False)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    # Skipped on a re-run or not, a finished point is finished: the report is about results.
    status = str(record["status"]) if record else (FINISHED if metrics else "unknown")
    # A pruned point has no final value: its objective column stays empty, the note says where it stopped.
    value = metrics.get(objective) if status not in (FAILED, PRUNED) else None
    return Point(
        num=int(record.get("num", run_dir.name) if str(record.get("num", run_dir.name)).isdigit() else -1),
        run_dir=run_dir,
        status=status,
        overrides=overrides,
        config=_flatten(config),
        metrics=metrics,
        objective=value if value is not None and math.isfinite(value) else None,
        error=record.get("error") or _pruned_note(record, objective),
        sweep_name=record.get("sweep"),
        curves=_read_curves(run_dir),
    )


def _pruned_note(record: dict[str, Any], objective: str) -> str:
    """Where a pruned point stopped, and its objective there."""
    if record.get("status") != PRUNED:
        return ""
    value = record.get("objective")
    shown = f": {objective}={value:.4f}" if isinstance(value, (int, float)) else ""
    return f"pruned at step {record.get('pruned_at_step')}{shown}"


def load_points(sweep_dir: Path, objective: str) -> list[Point]:
    """Every point of the sweep in ``sweep_dir`` (a dir of Hydra job dirs)."""
    dirs = _point_dirs(sweep_dir)
    if not dirs:
        raise UserError(f"{sweep_dir}: no sweep points here (expected <sweep dir>/<n>/.hydra/config.yaml)")
    return [load_point(d, objective) for d in dirs]


def sweep_objective(sweep_dir: Path) -> str:
    """The objective the sweep's points were run with (``objective`` in their config)."""
    for run_dir in _point_dirs(sweep_dir):
        value = OmegaConf.load(run_dir / ".hydra" / "config.yaml").get("objective")
        if value:
            return str(value)
    return "val/loss"


def best_point(points: list[Point], direction: str) -> Point | None:
    """The point with the best objective, or None when none finished."""
    return best_of(points, lambda p: p.objective, direction)


def parameter_value(point: Point, key: str) -> str:
    """A swept parameter's value at ``point``: its override, else its value in the config."""
    values = override_strings.as_dict(point.overrides)
    return values[key] if key in values else str(point.config.get(key, ""))


# ------------------------------------------------------------------------------------------- writing
def _write_atomic(path: Path, text: str) -> None:
    from lmexp.cache import atomic_write_text

    atomic_write_text(path, text)


def _csv_text(points: list[Point], keys: list[str], objective: str, best: Point | None) -> str:
    metric_names = sorted({name for p in points for name in p.metrics})
    config_names = sorted({name for p in points for name in p.config})
    header = [
        "point",
        "status",
        "best",
        objective,
        *keys,
        *(f"metric:{m}" for m in metric_names),
        "error",
        "run_dir",
        *(f"config:{c}" for c in config_names),
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for p in points:
        writer.writerow(
            [
                p.num,
                p.status,
                p is best,
                "" if p.objective is None else p.objective,
                *(parameter_value(p, k) for k in keys),
                *(p.metrics.get(m, "") for m in metric_names),
                p.error,
                str(p.run_dir),
                *(p.config.get(c, "") for c in config_names),
            ]
        )
    return buffer.getvalue()


def _table_rows(
    points: list[Point], keys: list[str], best: Point | None
) -> tuple[list[str], list[list[str]]]:
    metrics = [m for m in HEADLINE_METRICS if any(m in p.metrics for p in points)]
    header = ["point", "status", "objective", *keys, *metrics, "run dir", "error"]
    rows = []
    for p in points:
        value = "" if p.objective is None else f"{p.objective:.4f}" + (" **best**" if p is best else "")
        cells = [
            str(p.num),
            p.status,
            value,
            *(parameter_value(p, k) for k in keys),
            *(f"{p.metrics[m]:.4g}" if m in p.metrics else "" for m in metrics),
            p.run_dir.name,
            p.error,
        ]
        rows.append(cells)
    return header, rows


def _markdown(
    sweep_dir: Path,
    objective: str,
    direction: str,
    points: list[Point],
    keys: list[str],
    best: Point | None,
    plots: list[Path],
) -> str:
    header, rows = _table_rows(points, keys, best)
    counts = {s: sum(p.status == s for p in points) for s in sorted({p.status for p in points})}
    lines = [
        f"# Sweep report: {sweep_dir.name}",
        "",
        f"Sweep dir: `{sweep_dir}`  ",
        f"Objective: `{objective}` ({direction})  ",
        "Points: " + ", ".join(f"{n} {s}" for s, n in counts.items()),
        "",
    ]
    if best:
        swept = " ".join(f"{k}={parameter_value(best, k)}" for k in keys)
        lines += [
            f"**Best: point {best.num}** ({swept}): {objective} = {best.objective:.4f}, "
            f"run dir `{best.run_dir}`",
            "",
        ]
    escape = lambda cell: cell.replace("|", "\\|")  # noqa: E731
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    for plot in plots:
        lines += ["", f"![{plot.stem}]({plot.relative_to(sweep_dir).as_posix()})"]
    return "\n".join(lines) + "\n"


def _html(
    title: str,
    markdown_summary: list[str],
    points: list[Point],
    keys: list[str],
    best: Point | None,
    plots: list[Path],
    sweep_dir: Path,
) -> str:
    header, rows = _table_rows(points, keys, best)

    def cells(tag: str, row: list[str]) -> str:
        return "".join(f"<{tag}>{html.escape(c.replace(' **best**', ' ★ best'))}</{tag}>" for c in row)

    body = [
        f"<h1>{html.escape(title)}</h1>",
        *(f"<p>{html.escape(line)}</p>" for line in markdown_summary),
        "<table>",
        f"<tr>{cells('th', header)}</tr>",
    ]
    for point, row in zip(points, rows, strict=True):
        style = ' class="best"' if point is best else ""
        body.append(f"<tr{style}>{cells('td', row)}</tr>")
    body.append("</table>")
    body += [
        f'<p><img src="{html.escape(p.relative_to(sweep_dir).as_posix())}" alt="{p.stem}"></p>' for p in plots
    ]
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px}tr.best{background:#e6ffe6}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


# --------------------------------------------------------------------------------------------- plots
def _label(point: Point, keys: list[str]) -> str:
    return f"#{point.num} " + " ".join(f"{k.split('.')[-1]}={parameter_value(point, k)}" for k in keys)


def _save(figure: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=110, bbox_inches="tight")
    temporary.replace(path)
    return path


def plot_learning_curves(points: list[Point], keys: list[str], objective: str, path: Path) -> Path:
    """Training loss and the objective by step, one line per point."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for point in points:
        for axis, name in zip(axes, ("train/loss", objective), strict=True):
            curve = point.curves.get(name)
            if curve:
                axis.plot(
                    *zip(*curve, strict=True),
                    label=_label(point, keys),
                    marker="." if len(curve) < 20 else None,
                )
    for axis, name in zip(axes, ("train/loss", objective), strict=True):
        axis.set(xlabel="step", ylabel=name, title=name)
        axis.grid(alpha=0.3)
    if any(axis.lines for axis in axes):
        axes[1].legend(fontsize=7, loc="upper right")
    saved = _save(figure, path)
    plt.close(figure)
    return saved


def _numbers(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def plot_objective_vs(points: list[Point], key: str, objective: str, best: Point | None, path: Path) -> Path:
    """The objective of every finished point against one swept parameter (log axis for wide ranges)."""
    import matplotlib.pyplot as plt

    done = [p for p in points if p.objective is not None]
    values = [parameter_value(p, key) for p in done]
    numbers = _numbers(values)
    figure, axis = plt.subplots(figsize=(6, 4.5))
    x = numbers if numbers is not None else values
    axis.scatter(x, [p.objective for p in done], color="tab:blue")
    if best in done:
        index = done.index(best)
        axis.scatter([x[index]], [best.objective], color="tab:red", marker="*", s=200, label="best", zorder=3)
        axis.legend()
    if numbers and min(numbers) > 0 and max(numbers) / min(numbers) >= 10:
        axis.set_xscale("log")
    axis.ticklabel_format(axis="y", useOffset=False)  # the objective's own digits, not an offset
    axis.set(xlabel=key, ylabel=objective, title=f"{objective} vs {key}")
    axis.grid(alpha=0.3)
    saved = _save(figure, path)
    plt.close(figure)
    return saved


def draw_plots(
    points: list[Point], keys: list[str], objective: str, best: Point | None, plot_dir: Path
) -> list[Path]:
    """Every plot of the report, as PNG files in ``plot_dir``."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    plots = [plot_learning_curves(points, keys, objective, plot_dir / "learning_curves.png")]
    for key in keys:
        name = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)
        plots.append(plot_objective_vs(points, key, objective, best, plot_dir / f"objective_vs_{name}.png"))
    return plots


# ----------------------------------------------------------------------------------------------- W&B
def _wandb_settings(points: list[Point]) -> dict[str, Any] | None:
    for point in points:
        node = {
            k.removeprefix("logger.wandb."): v
            for k, v in point.config.items()
            if k.startswith("logger.wandb.")
        }
        if node:
            return node
    return None


def build_wandb_report(sweep_name: str, project: str, entity: str, objective: str, keys: list[str]) -> Any:
    """A W&B Report of the runs in group ``sweep_name``: curves, objective vs each parameter, and
    parallel coordinates."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    runset = wr.Runset(
        entity=entity,
        project=project,
        name=f"sweep {sweep_name}",
        filters=[expr.Metric("Group") == sweep_name],
    )
    panels = [
        wr.LinePlot(title=objective, x="Step", y=[objective]),
        wr.LinePlot(title="train/loss", x="Step", y=["train/loss"]),
    ]
    panels += [
        wr.ScatterPlot(title=f"{objective} vs {k}", x=wr.Config(k), y=wr.SummaryMetric(objective))
        for k in keys
    ]
    columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k)) for k in keys]
    panels.append(
        wr.ParallelCoordinatesPlot(
            columns=[*columns, wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(objective))]
        )
    )
    return wr.Report(
        project=project,
        entity=entity,
        title=f"Sweep {sweep_name}"[:128],
        description=f"lmexp sweep {sweep_name}: {objective} over {', '.join(keys) or 'its points'}",
        blocks=[wr.H1(f"Sweep {sweep_name}"), wr.PanelGrid(runsets=[runset], panels=panels)],
    )


def publish_wandb_report(points: list[Point], sweep_dir: Path, objective: str, keys: list[str]) -> str:
    """Save the W&B Report when the sweep's runs went to W&B online; say why not otherwise."""
    from lmexp.training.loggers import resolve_wandb_mode

    settings = _wandb_settings(points)
    if not settings:
        return "W&B report: skipped (the sweep's runs had no wandb logger)"
    mode = resolve_wandb_mode(str(settings.get("mode", "auto")))
    if mode != "online":
        upload = "wandb sync <run dir>/wandb/offline-run-*"
        return f"W&B report: skipped (W&B is {mode}; upload the runs with {upload}, then run this again)"
    import wandb

    group = settings.get("group")
    recorded = next((p.sweep_name for p in points if p.sweep_name), sweep_dir.name)
    sweep_name = group if isinstance(group, str) and "${" not in group else recorded
    entity = settings.get("entity") if "${" not in str(settings.get("entity") or "${") else None
    entity = entity or wandb.Api().default_entity
    report = build_wandb_report(sweep_name, str(settings.get("project") or "lmexp"), entity, objective, keys)
    report.save()
    return f"W&B report: {report.url}"


# ------------------------------------------------------------------------------------------------ API
def write_report(
    sweep_dir: Path | str,
    objective: str | None = None,
    direction: str = "minimize",
    plots: bool = True,
    wandb: bool = False,
) -> dict[str, Any]:
    """Write report.csv, report.md, report.html and the plots into ``sweep_dir``; return their paths."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir}: no such sweep dir")
    if direction not in ("minimize", "maximize"):
        raise UserError(f"report.direction={direction!r}: expected minimize or maximize")
    objective = objective or sweep_objective(sweep_dir)
    points = load_points(sweep_dir, objective)
    keys = swept_keys([p.record for p in points])
    best = best_point(points, direction)
    plot_paths = draw_plots(points, keys, objective, best, sweep_dir / "plots") if plots else []
    markdown = _markdown(sweep_dir, objective, direction, points, keys, best, plot_paths)
    summary = [line.strip() for line in markdown.splitlines()[2:6] if line.strip()]
    if is_ladder_sweep(sweep_dir):  # a scaling-law ladder: its fits, isoFLOP curves and hold-out follow
        scaling_markdown, scaling_plots = scaling_section(sweep_dir)
        markdown = f"{markdown.rstrip()}\n\n{scaling_markdown}"
        summary.append(summary_line(sweep_dir))
        plot_paths = [*plot_paths, *scaling_plots]
    written = {
        "csv": sweep_dir / "report.csv",
        "md": sweep_dir / "report.md",
        "html": sweep_dir / "report.html",
    }
    _write_atomic(written["csv"], _csv_text(points, keys, objective, best))
    _write_atomic(written["md"], markdown)
    _write_atomic(
        written["html"],
        _html(f"Sweep report: {sweep_dir.name}", summary, points, keys, best, plot_paths, sweep_dir),
    )
    written |= {"plots": plot_paths, "best": best, "points": points}
    if wandb:
        written["wandb"] = publish_wandb_report(points, sweep_dir, objective, keys)
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m lmexp.report <sweep dir> [report.objective=... report.wandb=true ...]``."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from lmexp.config.compose import config_dir

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    sweep_dir, overrides = Path(args[0]), args[1:]
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            options = compose("report", overrides=overrides).report
    except HydraException as error:
        raise UserError(f"conf/report.yaml: {error}") from None
    written = write_report(
        sweep_dir,
        objective=options.objective,
        direction=options.direction,
        plots=options.plots,
        wandb=options.wandb,
    )
    best = written["best"]
    print(
        f"report: {written['md']}, {written['html'].name}, {written['csv'].name} "
        f"({len(written['points'])} points, {len(written['plots'])} plots)"
    )
    if best is not None:
        print(f"best: point {best.num} {best.objective:.4f} ({best.run_dir})")
    if "wandb" in written:
        print(written["wandb"])
    else:
        print("W&B report: not requested (report.wandb=true to create one)")
    return 0
