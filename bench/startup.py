"""Startup: wall time of ``python -m lmexp.train trainer.max_steps=1`` with warm caches, and where it goes.

The wall time is measured from outside, over the real command line. The split comes from a probe
process (``python -m bench.startup probe ...``) that runs the same job step by step and times each
phase: the interpreter alone, the imports a run needs, Hydra's composition, the data (corpus,
tokenizer, token file: all cached), the model and task, the loggers (W&B starts its service here),
the Lightning trainer, fit's setup up to the first batch, the first training step, and the rest
(final validation, test, checkpoints, metrics.json), and the exit (W&B's service shutting down). The
command's wall time also holds Hydra's run setup (run dir, ``.hydra/``, logging), which the probe skips:
``wall_sec - phases_sum_sec`` is about that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Result, median

JOB = ["trainer.max_steps=1", "trainer.val_check_interval=1", "logger=[csv,wandb]"]
SMOKE_JOB = ["debug=fast", *JOB]
PHASES = (
    "interpreter",
    "imports",
    "compose",
    "data",
    "model",
    "loggers",
    "trainer",
    "fit_setup",
    "first_step",
    "rest",
)


def _env() -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "offline"}
    env.pop("WANDB_SERVICE", None)  # a fresh process starts its own W&B service, as a user's run does
    return env


def _wall(args: list[str], cwd: str) -> float:
    start = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return seconds


def command_wall(job: list[str], rounds: int) -> tuple[list[float], list[float]]:
    """Wall seconds of the real command and of a bare interpreter, alternating, ``rounds`` each."""
    commands, interpreter = [], []
    with tempfile.TemporaryDirectory(prefix="lmexp-bench-") as cwd:
        for _ in range(rounds):
            commands.append(_wall([sys.executable, "-m", "lmexp.train", *job], cwd))
            interpreter.append(_wall([sys.executable, "-c", "pass"], cwd))
    return commands, interpreter


def probe_phases(job: list[str]) -> tuple[dict[str, float], float]:
    """Run the probe in a fresh process; returns seconds per phase (without the interpreter) and its wall."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="lmexp-bench-") as cwd:
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "bench.startup", "probe", *job],
            cwd=cwd,
            env={
                **_env(),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
            },
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"startup probe failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


def _probe(job: list[str]) -> None:
    """The probe itself: the job of ``lmexp.train``, phase by phase, each timed; prints JSON."""
    marks: dict[str, float] = {}
    clock = time.perf_counter
    start = clock()
    import lightning.pytorch  # noqa: F401  - imports every run needs, at the top as a run does them
    import torch  # noqa: F401

    import lmexp.train
    import lmexp.training.build as builders
    from lmexp.config.compose import compose_job

    marks["imports"] = clock() - start

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            begin = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                marks[name] = marks.get(name, 0.0) + clock() - begin

        return wrapper

    begin = clock()
    run_dir = tempfile.mkdtemp(prefix="lmexp-bench-")
    cfg = compose_job(job, Path(run_dir))
    marks["compose"] = clock() - begin

    build_datamodule = builders.build_datamodule

    def datamodule_timed(*args: Any, **kwargs: Any) -> Any:
        datamodule = timed("data", build_datamodule)(*args, **kwargs)
        datamodule.prepare = timed("data", datamodule.prepare)
        return datamodule

    builders.build_datamodule = datamodule_timed
    builders.build_task = timed("model", builders.build_task)
    builders.build_loggers = timed("loggers", builders.build_loggers)
    builders.build_trainer = timed("trainer", builders.build_trainer)

    from lightning.pytorch.callbacks import Callback

    class FirstStep(Callback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            marks["_fit_start"] = clock()

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            marks.setdefault("_first_batch", clock())

        def on_train_batch_end(self, *args: Any) -> None:
            marks.setdefault("_first_batch_end", clock())

    begin = clock()
    lmexp.train.train(cfg, extra_callbacks=[FirstStep()])
    end = clock()
    before_fit = marks["_fit_start"] - begin - sum(marks[k] for k in ("data", "model", "loggers", "trainer"))
    marks["fit_setup"] = marks["_first_batch"] - marks["_fit_start"] + before_fit
    marks["first_step"] = marks["_first_batch_end"] - marks["_first_batch"]
    marks["rest"] = end - marks["_first_batch_end"]
    print(json.dumps({k: v for k, v in marks.items() if not k.startswith("_")}))


def run(smoke: bool = False, overrides: list[str] | None = None) -> list[Result]:
    job = [*(SMOKE_JOB if smoke else JOB), *(overrides or [])]
    rounds = 1 if smoke else 3
    if not smoke:  # one untimed run first, so every cache (corpus, tokenizer, token file, bytecode) is warm
        command_wall(job, 1)
    commands, interpreter = command_wall(job, rounds)
    probes = [probe_phases(job) for _ in range(rounds)]
    phases = {"interpreter": median(interpreter)}
    phases |= {name: median([p[name] for p, _ in probes]) for name in PHASES if name != "interpreter"}
    # What the probe's process spends outside its timed phases: mostly exit (W&B's service shutting down).
    phases["exit"] = median([wall - sum(p.values()) for p, wall in probes]) - phases["interpreter"]
    wall = median(commands)
    values = {"wall_sec": wall, **{f"{name}_sec": seconds for name, seconds in phases.items()}}
    values["phases_sum_sec"] = sum(phases.values())
    return [
        Result(
            name="startup/max_steps_1",
            values=values,
            ratio=wall / phases["interpreter"],
            ratio_meaning="wall time / bare interpreter start",
            goal="budget: see phases",
            notes=[
                f"python -m lmexp.train {' '.join(job)}",
                f"warm caches, median of {rounds} alternating runs",
            ],
        )
    ]


if __name__ == "__main__":
    if sys.argv[1:2] != ["probe"]:
        raise SystemExit("usage: python -m bench.startup probe <lmexp.train overrides>")
    _probe(sys.argv[2:])
