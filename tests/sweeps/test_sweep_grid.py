"""A grid sweep through ``python -m lmexp.train -m``: failure isolation, the summary, resume, the report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import wandb_records
from tests.sweeps.sweep_helpers import records, run_lmexp, sweep_args

# debug=fast makes the model 32 wide: 3 heads do not divide it, so the middle point is a bad config.
GRID = ("model.n_head=1,3,2",)


@pytest.fixture(scope="module")
def grid(workdir: Path, env: dict[str, str]):
    """The 3-point grid, run once for the module: (the finished process, the sweep dir)."""
    result = run_lmexp("train", *sweep_args(workdir / "out", "grid", *GRID), cwd=workdir, env=env)
    return result, workdir / "out" / "multirun" / "grid"


@pytest.mark.slow
def test_a_bad_point_fails_alone_and_the_summary_lists_every_point(grid):
    result, sweep_dir = grid
    assert result.returncode == 0, result.stderr[-3000:]
    points = records(sweep_dir)
    assert [points[n]["status"] for n in (0, 1, 2)] == ["finished", "failed", "finished"]
    assert "model.n_embd=32 is not divisible by model.n_head=3" in points[1]["error"]
    for n in (0, 2):
        metrics = json.loads((sweep_dir / str(n) / "metrics.json").read_text())
        assert points[n]["objective"] == pytest.approx(metrics["val/loss"])
    assert not (sweep_dir / "1" / "metrics.json").exists()
    # One error line for the bad point, no traceback; the summary names every point and the best one.
    assert "error: point 1 failed: model.n_embd=32 is not divisible by model.n_head=3" in result.stderr
    assert "Traceback" not in result.stderr
    assert "lmexp sweep summary" in result.stdout
    assert "sweep: 2 finished, 1 failed; best: point" in result.stdout
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert [p["num"] for p in summary["points"]] == [0, 1, 2]
    best = min((0, 2), key=lambda n: points[n]["objective"])
    assert summary["best"] == best


def point_wandb_records(run_dir: Path) -> list[dict]:
    """The records of a point's offline W&B run."""
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"{run_dir} must hold exactly one W&B run, found {runs}"
    return wandb_records(runs[0])


@pytest.mark.slow
def test_each_point_is_its_own_wandb_run_in_the_sweep_group(grid):
    _, sweep_dir = grid
    run_ids = set()
    for n, n_head in ((0, "1"), (2, "2")):
        found = point_wandb_records(sweep_dir / str(n))
        run = next(r["run"] for r in found if r.get("type") == "run")
        assert run["run_group"] == "grid" and run["job_type"] == "sweep"
        assert f"model.n_head={n_head}" in run["tags"] and "debug=fast" in run["tags"]
        assert not any(tag.startswith(("paths.", "sweep.", "logger")) for tag in run["tags"])
        config = json.dumps([r for r in found if r.get("type") in ("config", "run")])
        assert '"n_head"' in config and '"optim"' in config  # the resolved config of the point
        run_ids.add(run["run_id"])
    assert len(run_ids) == 2  # finished between points: the second point did not reuse the first run


@pytest.mark.slow
def test_rerunning_the_sweep_skips_finished_points(grid, workdir: Path, env: dict[str, str]):
    _, sweep_dir = grid
    before = {n: (sweep_dir / str(n) / "metrics.json").stat().st_mtime_ns for n in (0, 2)}
    again = run_lmexp("train", *sweep_args(workdir / "out", "grid", *GRID), cwd=workdir, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skip: point 0" in again.stdout and "skip: point 2" in again.stdout
    assert "skip: point 1" not in again.stdout  # the failed point is tried again (and fails again)
    assert "error: point 1 failed" in again.stderr
    assert {n: (sweep_dir / str(n) / "metrics.json").stat().st_mtime_ns for n in (0, 2)} == before
    assert "1 skipped" not in again.stdout and "2 skipped, 1 failed" in again.stdout


@pytest.mark.slow
def test_the_report_holds_every_point_and_draws_the_plots(grid, capsys):
    from lmexp.sweeps.report import main

    _, sweep_dir = grid
    points = records(sweep_dir)
    assert main([str(sweep_dir), "report.wandb=true"]) == 0
    out = capsys.readouterr().out
    assert "W&B report: skipped (W&B is offline" in out

    with (sweep_dir / "report.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["point"] for r in rows] == ["0", "1", "2"]
    assert [r["status"] for r in rows] == ["finished", "failed", "finished"]
    assert [r["model.n_head"] for r in rows] == ["1", "3", "2"]
    best = min((0, 2), key=lambda n: points[n]["objective"])
    assert [r["best"] for r in rows] == [str(n == best) for n in range(3)]
    for n in (0, 2):
        metrics = json.loads((sweep_dir / str(n) / "metrics.json").read_text())
        assert float(rows[n]["metric:val/loss"]) == pytest.approx(metrics["val/loss"])
        assert rows[n]["config:model.n_head"] == str(n + 1 if n == 0 else 2)
    assert "not divisible" in rows[1]["error"]

    markdown = (sweep_dir / "report.md").read_text()
    assert f"**Best: point {best}**" in markdown
    assert markdown.count("\n| ") == 4  # the header and one row per point
    assert "model.n_embd=32 is not divisible by model.n_head=3" in markdown
    html = (sweep_dir / "report.html").read_text()
    assert 'src="plots/learning_curves.png"' in html and "★ best" in html
    for name in ("learning_curves.png", "objective_vs_model.n_head.png"):
        png = sweep_dir / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
