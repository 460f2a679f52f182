"""Compute saved by pruning: one Optuna search run twice through the real CLI, with and without a pruner.

``python -m bench.pruning [--trials 8] [--steps 40] [--every 5] [--pruner median] [--out DIR]``

Both searches sample the same learning rates (TPE samples at random, seeded, for its first
``n_startup_trials``, set above the number of trials), over a range whose top is hopeless, for the tiny
GPT of ``debug=fast``. It prints and writes (``<out>/pruning.json``) the training steps each search ran
(``steps`` in every point's sweep_point.json), their wall times, the trials pruned and whether both
searches found the same best trial. Not part of ``python -m bench``: it measures compute, not a speed
ratio against a peer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"


def search(name: str, trials: int, steps: int, every: int, pruner: str) -> list[str]:
    """The command line of one search."""
    return [
        "-m",
        "debug=fast",
        "logger=[csv]",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        f"sweep.name={name}",
        "hydra/sweeper=tpe",
        f"hydra.sweeper.n_trials={trials}",
        f"hydra.sweeper.sampler.n_startup_trials={trials + 1}",
        f"hydra.sweeper.pruner={pruner}",
        "hydra.sweeper.median.n_startup_trials=2",
        f"hydra.sweeper.hyperband.min_resource={every}",
        f"hydra.sweeper.hyperband.max_resource={steps}",
        "optim.lr=tag(log,interval(0.001,30))",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={every}",
    ]


def run_search(output_dir: Path, name: str, args: list[str]) -> dict[str, Any]:
    """Run one search; its steps, wall time and points."""
    command = [sys.executable, "-m", "lmexp.train", *args, f"paths.output_dir={output_dir}"]
    started = time.perf_counter()
    subprocess.run(
        command, check=True, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"}
    )
    wall = time.perf_counter() - started
    points = [json.loads(p.read_text()) for p in (output_dir / "multirun" / name).glob("*/sweep_point.json")]
    points.sort(key=lambda p: p["num"])
    summary = json.loads((output_dir / "multirun" / name / "summary.json").read_text())
    return {
        "wall_sec": round(wall, 1),
        "steps": sum(p.get("steps") or 0 for p in points),
        "pruned": [p["num"] for p in points if p["status"] == "pruned"],
        "best": summary["best"],
        "points": [
            {k: p.get(k) for k in ("num", "status", "objective", "steps", "overrides")} for p in points
        ],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.pruning", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40, help="trainer.max_steps of every trial")
    parser.add_argument("--every", type=int, default=5, help="trainer.val_check_interval")
    parser.add_argument("--pruner", default="median", choices=("median", "hyperband"))
    parser.add_argument("--out", type=Path, default=OUT)
    options = parser.parse_args(argv)
    shape = (options.trials, options.steps, options.every)
    with tempfile.TemporaryDirectory(prefix="lmexp-bench-pruning-") as tmp:
        pruned = run_search(Path(tmp), "pruned", search("pruned", *shape, options.pruner))
        full = run_search(Path(tmp), "full", search("full", *shape, "none"))
    result = {
        "trials": options.trials,
        "max_steps": options.steps,
        "val_check_interval": options.every,
        "pruner": options.pruner,
        "steps_with_pruning": pruned["steps"],
        "steps_without_pruning": full["steps"],
        "steps_saved": round(1 - pruned["steps"] / full["steps"], 3),
        "wall_sec_with_pruning": pruned["wall_sec"],
        "wall_sec_without_pruning": full["wall_sec"],
        "trials_pruned": pruned["pruned"],
        "same_best_trial": pruned["best"] == full["best"],
        "with_pruning": pruned,
        "without_pruning": full,
    }
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "pruning.json").write_text(json.dumps(result, indent=1))
    headline = {k: v for k, v in result.items() if k not in ("with_pruning", "without_pruning")}
    print(json.dumps(headline, indent=1))
    return result


if __name__ == "__main__":
    main()
