"""The scaling section of a ladder's sweep report: fits, isoFLOP curves, the frontier and the hold-out.

``scaling_section(sweep_dir)`` reads every finished point of a ladder (``+sweep=ladder``; each point's
``.hydra/config.yaml``, ``metrics.json`` and ``sweep_point.json``), fits it with :mod:`lmexp.sweeps.scaling`
and returns the markdown of the section and the plots it drew into ``<sweep dir>/plots/``
(``isoflop.png``, ``frontier.png``); the numbers also go to ``<sweep dir>/scaling.json``.

Per point: N = lmexp's parameter count of the point's model (:func:`lmexp.sweeps.ladder.count_parameters`),
D = steps x tokens per step (``perf/global_step`` x ``perf/tokens_per_step`` in metrics.json), the budget
= ``sweep.budget`` of its config, L = its ``objective``.

**Units.** The fit is in the unit of the ladder's objective. On the built-in corpus ``val/bpw`` (bits per
word, the default) has its exact floor ``val/bpw_floor``: the corpus's entropy per word, so E is fixed to
it as it is, and bits per word do not depend on the tokenizer. With ``objective=val/loss`` (nats per
token) the floor is converted: floor x ln 2 x words / tokens of the validation split, where words / tokens
= val/loss / (val/bpw x ln 2) is read from the points themselves (it is the same for every point: one
split, one tokenizer). Without a floor (your own text) only the free-E fit is shown.

``python -m lmexp.sweeps.scaling_report <sweep dir> [--resamples 200] [--seed 0]`` writes the section as
``<sweep dir>/scaling.md`` on its own.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from lmexp.errors import DataError, UserError
from lmexp.sweeps.scaling import LadderPoints, LossSurface, ScalingAnalysis, analyse

FLOOR_METRIC = "val/bpw_floor"
UNITS = {"val/bpw": "bits per word", "val/loss": "nats per token"}


# ------------------------------------------------------------------------------------------ reading
@dataclass
class LadderRun:
    """A ladder's finished points as the fitter needs them, and what was left out."""

    points: LadderPoints
    objective: str
    floor_note: str
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per fitted point, for the table
    left_out: list[str] = field(default_factory=list)


def _point_dirs(sweep_dir: Path) -> list[Path]:
    dirs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/config.yaml")]
    return sorted(dirs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))


def is_ladder_sweep(sweep_dir: Path | str) -> bool:
    """True when the sweep's points are ladder points (their config has ``sweep.ladder``)."""
    from lmexp.sweeps.ladder import is_ladder

    dirs = _point_dirs(Path(sweep_dir))
    return bool(dirs) and is_ladder(OmegaConf.load(dirs[0] / ".hydra" / "config.yaml"))


def _point_row(run_dir: Path, objective: str) -> dict[str, Any] | str:
    """One point's numbers, or why it is left out."""
    from lmexp.sweeps.ladder import count_parameters
    from lmexp.sweeps.point import FINISHED, read_record

    record = read_record(run_dir) or {}
    metrics_path = run_dir / "metrics.json"
    if record.get("status", FINISHED) != FINISHED or not metrics_path.is_file():
        return f"point {run_dir.name}: {record.get('status', 'no metrics.json')}"
    metrics = json.loads(metrics_path.read_text())
    config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    value, budget = metrics.get(objective), OmegaConf.select(config, "sweep.budget", default=None)
    if value is None or not math.isfinite(value) or budget is None:
        return f"point {run_dir.name}: no {objective if value is None else 'sweep.budget'}"
    model = config.model
    steps = metrics.get("perf/global_step", config.trainer.max_steps)
    tokens_per_step = metrics.get("perf/tokens_per_step")
    if tokens_per_step is None:
        raise DataError(f"{metrics_path}: no perf/tokens_per_step; the ladder needs each point's tokens")
    return {
        "point": int(run_dir.name) if run_dir.name.isdigit() else run_dir.name,
        "budget": float(budget),
        "depth": int(model.n_layer),
        "width": int(model.n_embd),
        "N": count_parameters(config, int(model.n_layer), int(model.n_embd), int(model.n_head)),
        "D": int(steps) * int(tokens_per_step),
        "L": float(value),
        "floor_bpw": metrics.get(FLOOR_METRIC),
        "bpw": metrics.get("val/bpw"),
        "loss": metrics.get("val/loss"),
    }


def _floor(rows: list[dict[str, Any]], objective: str) -> tuple[float | None, str]:
    """The floor in the objective's unit, and how it was obtained."""
    floors = [r["floor_bpw"] for r in rows if r["floor_bpw"] is not None]
    if not floors:
        return None, f"no {FLOOR_METRIC} in the points' metrics: E is fitted only"
    floor_bpw = float(np.median(floors))
    if objective == "val/bpw":
        return floor_bpw, f"E fixed to {FLOOR_METRIC} = {floor_bpw:.4f} bits per word (the corpus's entropy)"
    if objective == "val/loss" and all(r["bpw"] and r["loss"] for r in rows):
        # val/loss / (val/bpw x ln 2) = words / tokens of the validation split, the same for every point.
        nats_per_bpw = float(np.median([r["loss"] / r["bpw"] for r in rows]))
        floor = floor_bpw * nats_per_bpw
        return floor, (
            f"E fixed to {FLOOR_METRIC} = {floor_bpw:.4f} bits per word = {floor:.4f} nats per token "
            f"(x ln 2 x {nats_per_bpw / math.log(2):.4f} words per token of the validation split)"
        )
    return None, f"no floor in {objective}'s unit: E is fitted only"


def load_ladder(sweep_dir: Path | str) -> LadderRun:
    """Read a ladder's sweep dir; DataError when it has no fittable points."""
    sweep_dir = Path(sweep_dir)
    dirs = _point_dirs(sweep_dir)
    if not dirs:
        raise DataError(f"{sweep_dir}: no sweep points here (expected <sweep dir>/<n>/.hydra/config.yaml)")
    objective = str(OmegaConf.load(dirs[0] / ".hydra" / "config.yaml").get("objective", "val/loss"))
    rows, left_out = [], []
    for run_dir in dirs:
        row = _point_row(run_dir, objective)
        (left_out if isinstance(row, str) else rows).append(row)
    if len(rows) < 4:
        raise DataError(f"{sweep_dir}: {len(rows)} finished ladder points; a scaling fit needs at least 4")
    floor, note = _floor(rows, objective)
    arrays = (np.array([r[key] for r in rows], dtype=float) for key in ("N", "D", "L", "budget"))
    return LadderRun(LadderPoints(*arrays, floor=floor), objective, note, rows, left_out)


# ------------------------------------------------------------------------------------------- plots
def _save(figure: Any, path: Path) -> Path:
    from lmexp.cache import atomic_path

    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110, bbox_inches="tight")
    return path


def _primary(analysis: ScalingAnalysis) -> tuple[str, LossSurface] | None:
    for name in ("fixed E", "free E"):
        if name in analysis.fits:
            return name, analysis.fits[name].surface
    return None


def plot_isoflops(analysis: ScalingAnalysis, objective: str, path: Path) -> Path:
    """Loss against N per budget: the points, each budget's parabola and vertex, the L(N, D) fit along
    the budget (C = 6ND), the floor, and the held-out budget's prediction."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    points = analysis.points
    figure, axis = plt.subplots(figsize=(7.5, 5))
    budgets = np.unique(points.budget)
    colours = plt.cm.viridis(np.linspace(0.0, 0.9, len(budgets)))
    parabolas = {fit.budget: fit for fit in analysis.frontier.isoflops}
    primary = _primary(analysis)
    held = analysis.holdout.budget if analysis.holdout else None
    for budget, colour in zip(budgets, colours, strict=True):
        chosen = points.budget == budget
        N = points.N[chosen]
        grid = np.geomspace(N.min() / 1.5, N.max() * 1.5, 100)
        hollow = budget == held
        axis.scatter(N, points.L[chosen], color=colour, facecolors="none" if hollow else colour, zorder=3,
                     label=f"C = {budget:.3g}" + (" (held out)" if hollow else ""))  # fmt: skip
        if budget in parabolas:
            parabola = parabolas[budget]
            axis.plot(grid, parabola.predict(grid), color=colour, linewidth=1)
            if parabola.inside:
                axis.scatter([parabola.N_opt], [parabola.L_opt], color=colour, marker="*", s=120, zorder=4)
        if primary:
            name, surface = primary
            axis.plot(grid, surface.predict(grid, budget / (6 * grid)), color=colour, linestyle="--",
                      linewidth=1, alpha=0.8)  # fmt: skip
    if analysis.holdout and primary and primary[0] in analysis.holdout.predicted:
        axis.scatter(analysis.holdout.N, analysis.holdout.predicted[primary[0]], marker="x", color="tab:red",
                     zorder=5, label=f"held out: predicted by the {primary[0]} fit of the rest")  # fmt: skip
    if points.floor is not None:
        axis.axhline(points.floor, color="grey", linestyle=":", label=f"floor E = {points.floor:.3f}")
    axis.set_xscale("log")
    axis.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap over a decade or less
    axis.set(xlabel="N (parameters in matrix multiplies)", ylabel=f"{objective} ({UNITS.get(objective, '')})")
    subtitle = f"dashed: L(N, D) fit ({primary[0]}) along C = 6ND" if primary else ""
    title = "isoFLOP curves: solid = parabola in log N, * = its minimum (when within the sizes)"
    axis.set_title(f"{title}\n{subtitle}", fontsize=10)
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    saved = _save(figure, path)
    plt.close(figure)
    return saved


def plot_frontier(analysis: ScalingAnalysis, path: Path) -> Path:
    """N*(C) and D*(C): the isoFLOP vertices, their power law, and the L(N, D) fits' closed forms."""
    import matplotlib.pyplot as plt

    budgets = np.unique(analysis.points.budget)
    C = np.geomspace(budgets.min() / 2, budgets.max() * 4, 50)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    vertices = analysis.frontier.vertices
    styles = {"fixed E": ("tab:blue", "-"), "free E": ("tab:orange", "--")}
    for index, (axis, label) in enumerate(zip(axes, ("N*", "D*"), strict=True)):
        if vertices:
            values = [v.N_opt if index == 0 else v.D_opt for v in vertices]
            axis.scatter([v.budget for v in vertices], values, color="black", zorder=3,
                         label="isoFLOP minima (approach 2)")  # fmt: skip
        law = analysis.frontier.N_opt if index == 0 else analysis.frontier.D_opt
        if law is not None:
            axis.plot(C, law.predict(C), color="black", linewidth=1,
                      label=f"power law through them: exponent {law.exponent:.3f}")  # fmt: skip
        for name, fit in analysis.fits.items():
            colour, style = styles[name]
            exponent = fit.surface.a if index == 0 else fit.surface.b
            axis.plot(C, fit.surface.optimum(C)[index], color=colour, linestyle=style,
                      label=f"L(N, D), {name}: exponent {exponent:.3f}")  # fmt: skip
        if analysis.holdout:
            axis.axvline(analysis.holdout.budget, color="grey", linestyle=":", linewidth=1)
        axis.set(xscale="log", yscale="log", xlabel="C (training FLOPs, 6ND)",
                 ylabel=f"{label} ({'parameters' if index == 0 else 'tokens'})")  # fmt: skip
        axis.set_title(f"compute-optimal {label}(C)", fontsize=10)
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=7)
    saved = _save(figure, path)
    plt.close(figure)
    return saved


# ---------------------------------------------------------------------------------------- markdown
def _ci(intervals: dict[str, tuple[float, float]], name: str, digits: str) -> str:
    if name not in intervals:
        return ""
    low, high = intervals[name]
    return f" [{low:{digits}}, {high:{digits}}]"


def _fit_table(analysis: ScalingAnalysis) -> list[str]:
    names = list(analysis.fits)
    header = "| parameter | " + " | ".join(f"{n} (95% CI)" for n in names) + " |"
    lines = [header, "|---|" + "---|" * len(names)]
    formats = {"E": ".4g", "A": ".4g", "alpha": ".3f", "B": ".4g", "beta": ".3f", "a": ".3f", "b": ".3f"}
    labels = {"a": "a (N* ~ C^a)", "b": "b (D* ~ C^b)"}
    for parameter, digits in formats.items():
        cells = []
        for name in names:
            fit = analysis.fits[name]
            value = fit.surface.values()[parameter]
            fixed = parameter == "E" and fit.surface.fixed_E
            bound = " (at its bound: the points do not pin it)" if parameter in fit.surface.at_bound else ""
            shown = " (fixed)" if fixed else _ci(fit.intervals, parameter, digits)
            cells.append(f"{value:{digits}}{shown}{bound}")
        lines.append(f"| {labels.get(parameter, parameter)} | " + " | ".join(cells) + " |")
    law = analysis.frontier
    if law.N_opt is not None:
        lines.append(
            f"| isoFLOP parabolas (approach 2): a, b | a = {law.N_opt.exponent:.3f}"
            f"{_ci(analysis.frontier_intervals, 'a', '.3f')}, b = {law.D_opt.exponent:.3f}"
            f"{_ci(analysis.frontier_intervals, 'b', '.3f')} |" + " |" * (len(names) - 1)
        )
    resamples = ", ".join(f"{n}: {f.resamples}" for n, f in analysis.fits.items())
    lines += ["", f"Bootstrap resamples that counted: {resamples}; isoFLOP: {analysis.frontier_resamples}."]
    return lines


def _points_table(run: LadderRun, analysis: ScalingAnalysis) -> list[str]:
    parabolas = {fit.budget: fit for fit in analysis.frontier.isoflops}
    lines = [
        f"| point | budget C | depth | width | N | D (tokens) | D/N | {run.objective} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(run.rows, key=lambda r: (r["budget"], r["N"])):
        lines.append(
            f"| {row['point']} | {row['budget']:.3g} | {row['depth']} | {row['width']} | {row['N']:,} | "
            f"{row['D']:,} | {row['D'] / row['N']:.1f} | {row['L']:.4f} |"
        )
    lines += ["", "| budget C | N_opt (parabola) | D_opt | loss at N_opt | minimum inside the sizes |",
              "|---|---|---|---|---|"]  # fmt: skip
    for budget, fit in sorted(parabolas.items()):
        if fit.N_opt is None:
            lines.append(f"| {budget:.3g} | no minimum (the parabola opens downward) | | | no |")
        elif not fit.inside:
            sizes = f"{fit.N_range[0]:,.0f}-{fit.N_range[1]:,.0f}"
            lines.append(f"| {budget:.3g} | ({fit.N_opt:.3g}) | | | no: outside {sizes}, not used |")
        else:
            lines.append(f"| {budget:.3g} | {fit.N_opt:,.0f} | {fit.D_opt:,.0f} | {fit.L_opt:.4f} | yes |")
    return lines


def _holdout_lines(analysis: ScalingAnalysis, objective: str) -> list[str]:
    holdout = analysis.holdout
    if holdout is None:
        return []
    unit = UNITS.get(objective, "")
    lines = [
        f"### Hold-out: the largest budget (C = {holdout.budget:.3g}) predicted from the others",
        "",
        "| fit | mean abs error | max abs error | mean relative error | bias | predicted N* | predicted L* |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in holdout.predicted:
        errors = holdout.errors(name)
        N_star, L_star = holdout.optimum_predicted[name]
        lines.append(
            f"| {name} | {errors['mean_abs']:.4f} | {errors['max_abs']:.4f} | "
            f"{100 * errors['mean_rel']:.2f}% | {errors['mean_signed']:+.4f} | {N_star:,.0f} | {L_star:.4f} |"
        )
    if "isoFLOP" in holdout.optimum_predicted:
        lines.append(f"| isoFLOP power law | | | | | {holdout.optimum_predicted['isoFLOP'][0]:,.0f} | |")
    observed = holdout.optimum_observed
    lines += [
        "",
        f"Errors in {unit}, over the held-out budget's {len(holdout.observed)} points. "
        + (
            f"Observed (its own parabola): N* = {observed[0]:,.0f}, L* = {observed[1]:.4f}."
            if observed
            else "Its own parabola has no minimum (or it has fewer than three sizes)."
        ),
    ]
    return lines


def scaling_markdown(run: LadderRun, analysis: ScalingAnalysis, plots: list[Path], sweep_dir: Path) -> str:
    """The section's markdown (plots linked relative to the sweep dir)."""
    unit = UNITS.get(run.objective, "")
    lines = [
        "## Scaling ladder: L(N, D) = E + A / N^alpha + B / D^beta",
        "",
        f"Fitted: `{run.objective}` ({unit}) of {len(run.rows)} points over "
        f"{len(np.unique(run.points.budget))} budgets. {run.floor_note}. N = parameters in matrix multiplies "
        "(embedding tables left out, output head counted), D = training tokens, C = 6ND. Approach 3 of "
        "Hoffmann et al. 2022 (Huber loss on log residuals, L-BFGS from a grid) and approach 2 (a parabola "
        "in log N per budget); 95% intervals from a seeded bootstrap.",
        "",
    ]
    if run.left_out:
        lines += ["Left out: " + "; ".join(run.left_out) + ".", ""]
    lines += _fit_table(analysis) + [""]
    primary = _primary(analysis)
    if primary:
        name, surface = primary
        lines += [
            f"Compute-optimal frontier ({name}): N* ~ C^{surface.a:.3f}, D* ~ C^{surface.b:.3f}.",
            "",
        ]
    lines += _holdout_lines(analysis, run.objective) + [""]
    lines += ["### Points", ""] + _points_table(run, analysis) + [""]
    lines += [f"Note: {note}." for note in analysis.notes]
    lines += [f"\n![{p.stem}]({p.relative_to(sweep_dir).as_posix()})" for p in plots]
    return "\n".join(lines) + "\n"


def _json(run: LadderRun, analysis: ScalingAnalysis) -> dict[str, Any]:
    frontier = analysis.frontier
    holdout = analysis.holdout
    return {
        "objective": run.objective,
        "floor": run.points.floor,
        "fits": {
            name: {"values": fit.surface.values(), "intervals": fit.intervals, "resamples": fit.resamples}
            for name, fit in analysis.fits.items()
        },
        "isoflop": [
            {"budget": f.budget, "N_opt": f.N_opt, "D_opt": f.D_opt, "L_opt": f.L_opt, "inside": f.inside}
            for f in frontier.isoflops
        ],
        "frontier": None
        if frontier.N_opt is None
        else {
            "a": frontier.N_opt.exponent,
            "b": frontier.D_opt.exponent,
            "intervals": analysis.frontier_intervals,
        },
        "holdout": None
        if holdout is None
        else {
            "budget": holdout.budget,
            "errors": {name: holdout.errors(name) for name in holdout.predicted},
            "optimum_observed": holdout.optimum_observed,
            "optimum_predicted": holdout.optimum_predicted,
        },
        "points": run.rows,
        "left_out": run.left_out,
        "notes": analysis.notes,
    }


def scaling_section(sweep_dir: Path | str, n_resamples: int = 200, seed: int = 0) -> tuple[str, list[Path]]:
    """Fit the ladder in ``sweep_dir``; draw ``plots/isoflop.png`` and ``plots/frontier.png``; write
    ``scaling.json``; return the section's markdown and the plot paths."""
    import matplotlib

    from lmexp.cache import atomic_write_json

    matplotlib.use("Agg")  # files only; no display needed
    sweep_dir = Path(sweep_dir)
    run = load_ladder(sweep_dir)
    analysis = analyse(run.points, n_resamples=n_resamples, seed=seed)
    plots = [
        plot_isoflops(analysis, run.objective, sweep_dir / "plots" / "isoflop.png"),
        plot_frontier(analysis, sweep_dir / "plots" / "frontier.png"),
    ]
    atomic_write_json(sweep_dir / "scaling.json", _json(run, analysis))
    return scaling_markdown(run, analysis, plots, sweep_dir), plots


def summary_line(sweep_dir: Path | str) -> str:
    """One line of the fitted exponents and the hold-out error, from ``<sweep dir>/scaling.json``."""
    fitted = json.loads((Path(sweep_dir) / "scaling.json").read_text())
    parts = []
    for name, fit in fitted["fits"].items():
        values, intervals = fit["values"], fit["intervals"]
        shown = ", ".join(
            f"{key}={values[key]:.3f}"
            + (f" [{intervals[key][0]:.3f}, {intervals[key][1]:.3f}]" if key in intervals else "")
            for key in ("alpha", "beta", "a", "b")
        )
        parts.append(f"{name}: E={values['E']:.4g}, {shown}")
    if fitted["frontier"]:
        parts.append(f"isoFLOP: a={fitted['frontier']['a']:.3f}, b={fitted['frontier']['b']:.3f}")
    holdout = fitted["holdout"]
    if holdout:
        errors = ", ".join(
            f"{name} {e['mean_abs']:.4f} ({100 * e['mean_rel']:.1f}%)"
            for name, e in holdout["errors"].items()
        )
        parts.append(f"hold-out C={holdout['budget']:.3g}: mean abs error {errors}")
    return f"scaling ({fitted['objective']}): " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """``python -m lmexp.sweeps.scaling_report <sweep dir>``: write ``scaling.md`` and print it."""
    from lmexp.cache import atomic_write_text

    parser = argparse.ArgumentParser(
        prog="python -m lmexp.sweeps.scaling_report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--resamples", type=int, default=200, help="bootstrap resamples (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        raise UserError(f"{args.sweep_dir}: no such sweep dir")
    if not is_ladder_sweep(args.sweep_dir):
        raise UserError(
            f"{args.sweep_dir}: not a ladder (its points' config has no sweep.ladder; +sweep=ladder)"
        )
    markdown, _ = scaling_section(args.sweep_dir, args.resamples, args.seed)
    atomic_write_text(args.sweep_dir / "scaling.md", markdown)
    print(markdown)
    print(summary_line(args.sweep_dir))
    print(f"scaling report: {args.sweep_dir / 'scaling.md'}")
    return 0


if __name__ == "__main__":
    from lmexp.errors import full_errors_requested

    try:
        raise SystemExit(main())
    except UserError as error:
        if full_errors_requested():
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
