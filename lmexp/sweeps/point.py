"""Sweeps (``python -m lmexp.train -m ...``): failure isolation, resume, and an end-of-sweep summary.

Each point of a sweep runs through :func:`sweep_point`, which

* skips a point whose run dir already holds a finished ``metrics.json`` for the same overrides (unless
  ``sweep.rerun=true``), so re-running a sweep command finishes only what is missing;
* lets a point that was interrupted (killed, preempted, requeued) continue from its own checkpoints
  (``resume=auto`` does that in the point's run dir); a forced re-run, or a new attempt at a point that
  failed, starts afresh;
* skips a point whose run dir another process holds (a sweep still running it: ``busy: point N ...``; the
  summary lists it as busy, lmexp/training/run_lock.py);
* turns a failing point (bad config, crash, NaN objective) into a recorded failure instead of an
  exception, so the other points still run. Hydra's launchers re-raise a failed job's exception when its
  return value is read, and ``lmexp.cli.guarded`` turns user errors into ``SystemExit``, which escapes
  Hydra's job runner altogether: the point must not raise at all;
* records a trial that its Optuna pruner stopped (lmexp/sweeps/pruning.py) as pruned, not failed; like a
  finished point, a pruned one is skipped when the sweep runs again.

Every point writes ``sweep_point.json`` (status, objective, overrides, error line, training steps) into its
run dir; lmexp/sweeps/summary.py reads them all at the end of the sweep.

Several ranks of one point each run it through Hydra when the cluster starts them (``srun``, torchrun;
ranks that Lightning starts itself run rank 0's config without Hydra). Only global rank 0 decides: it
writes the point's RUNNING record with its resume decision and the id of this attempt (:func:`attempt_id`),
and a rank that finds that record follows the decision instead of taking the record for an interrupted
attempt. A rank that reads the record from before rank 0 wrote decides from it exactly as rank 0 did.

The launcher of ``hydra/launcher=local`` and the resumable Optuna sweeper of ``hydra/sweeper=tpe`` live in
``hydra_plugins/lmexp_sweep`` (Hydra only accepts plugins from its ``hydra_plugins`` namespace).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig

from lmexp.config import overrides as override_strings
from lmexp.config.compose import is_multirun, point_overrides
from lmexp.errors import TrialPruned, UserError, full_errors_requested

T = TypeVar("T")
RECORD_NAME = "sweep_point.json"
FINISHED, FAILED, RUNNING, SKIPPED = "finished", "failed", "running", "skipped"
BUSY, PRUNED = "busy", "pruned"
DONE = (FINISHED, PRUNED)  # a re-run of the sweep skips these points
PRUNED_RETURN = "pruned: "  # how a pruned point's return value starts (the Optuna sweeper reads it)
TRIAL_ENV = "LMEXP_OPTUNA_TRIAL"  # a pruning sweep's trial number, set by the sweeper for the trial's job


# ------------------------------------------------------------------------------------- point records


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The point record of ``run_dir``, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(run_dir) / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None


def _global_rank() -> int:
    # A point's record is written by rank 0 only (ranks started by srun or torchrun run the job too).
    from lmexp.cli import external_rank

    return external_rank()


def write_record(directory: Path, /, **record: Any) -> None:
    """Write the point record of the run dir ``directory`` atomically (rank 0 only)."""
    from lmexp.cache import atomic_write_json

    if _global_rank() == 0:
        atomic_write_json(Path(directory) / RECORD_NAME, {**record, "updated": time.time()})


def attempt_id() -> str | None:
    """What every rank of one start of a job shares and a later start (a requeue, a rerun) does not: the
    SLURM job, step and restart count, or torchrun's run id and restart count; else ``LMEXP_ATTEMPT_ID``
    (None when nothing tells: each rank then decides for itself)."""
    env = os.environ
    if env.get("SLURM_JOB_ID"):
        job = env["SLURM_JOB_ID"]
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
            job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        return f"slurm:{job}.{env.get('SLURM_STEP_ID', '')}:{env.get('SLURM_RESTART_COUNT', '0')}"
    if env.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun:{env['TORCHELASTIC_RUN_ID']}:{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return env.get("LMEXP_ATTEMPT_ID") or None


def one_line(error: BaseException) -> str:
    """A failing point's error as one line: user errors as they are, others with their type."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, UserError) else f"{type(error).__name__}: {text}"


# ---------------------------------------------------------------------------------------- the point
def sweep_point(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Wrap a Hydra task function so that, in a sweep, a point is skipped, resumed or isolated."""

    @functools.wraps(task)
    def wrapper(cfg: DictConfig) -> Any:
        if not is_multirun():
            try:
                return task(cfg)
            except TrialPruned as stop:  # a DDP rank Lightning started for a trial's job: rank 0 records it
                print(f"pruned: {stop}", flush=True)
                return None
        return run_point_if_free(task, cfg)

    return wrapper


def point_identity(overrides: list[str]) -> list[str]:
    """The overrides that decide what a point computes: ``sweep.*`` (rerun, report, ...) only steer it."""
    return override_strings.without(overrides, ["sweep"])


def _done_before(run_dir: Path, previous: dict | None, overrides: list[str]) -> bool:
    """This very point finished (its metrics.json is there) or was pruned in an earlier attempt."""
    return bool(
        previous
        and previous.get("status") in DONE
        and point_identity(previous.get("overrides", [])) == point_identity(overrides)
        and (previous.get("status") == PRUNED or (run_dir / "metrics.json").is_file())
    )


def _interrupted(previous: dict, overrides: list[str]) -> bool:
    """An earlier attempt at this very point that died while running (killed, preempted, requeued)."""
    return previous.get("status") == RUNNING and point_identity(
        previous.get("overrides", [])
    ) == point_identity(overrides)


def _start_afresh(cfg: DictConfig) -> None:
    """Train anew, not from the checkpoints in the run dir: they belong to a finished or failed attempt
    (resuming would end at once, or repeat the failure) or to another point that used this dir."""
    if "resume" in cfg:
        cfg.resume = "never"


def run_point_if_free(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """:func:`run_point`, holding the point's run dir; a dir another process holds (a sweep still running
    this point) is skipped: nothing in it is touched, and the point keeps its previous objective, if any."""
    from hydra.core.hydra_config import HydraConfig

    from lmexp.training.run_lock import RunDirBusy, holding

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        with holding(run_dir):
            return run_point(task, cfg)
    except RunDirBusy as busy:
        holder = busy.holder.describe() if busy.holder else "another process"
        print(
            f"busy: point {run_dir.name} ({' '.join(point_overrides())}) is held by {holder}: skipped",
            flush=True,
        )
        previous = read_record(run_dir) or {}
        return previous.get("objective") if previous.get("status") == FINISHED else f"busy: held by {holder}"


def _decided_by_rank_zero(previous: dict | None, attempt: str | None) -> bool:
    """``previous`` is the RUNNING record that rank 0 of this very attempt wrote (a rank > 0 follows it)."""
    return bool(
        attempt
        and previous
        and previous.get("status") == RUNNING
        and previous.get("attempt") == attempt
        and _global_rank() > 0
    )


def run_point(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run one point of a sweep; return its objective, or a ``failed: ...`` string when it failed.

    The string is not a number on purpose: the Optuna sweeper marks such a trial as failed (with this
    message) rather than feeding the sampler a made-up value.
    """
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    overrides = point_overrides()
    objective = str(cfg.get("objective", "val/loss"))
    sweep = cfg.get("sweep") or {}
    base = {
        "num": int(HydraConfig.get().job.num),
        "overrides": overrides,
        "run_dir": str(run_dir),
        "objective_name": objective,
        "sweep": sweep.get("name"),
    }
    trial = os.environ.get(TRIAL_ENV, "")
    if trial.isdigit():
        base["trial"] = int(trial)
    previous = read_record(run_dir)
    attempt = attempt_id()
    if _decided_by_rank_zero(previous, attempt):
        if "resume" in cfg:
            cfg.resume = previous.get("resume", cfg.resume)
    elif _done_before(run_dir, previous, overrides) and not sweep.get("rerun", False):
        return _skip(run_dir, previous, overrides)
    elif previous and not _interrupted(previous, overrides):
        _start_afresh(cfg)
    resume = cfg.get("resume")
    write_record(run_dir, **base, status=RUNNING, started=time.time(), attempt=attempt, resume=resume)
    pruned = None
    try:
        value = task(cfg)
        error = _objective_problem(objective, value)
    except TrialPruned as stop:
        value, error, pruned = None, None, stop
    except Exception as exception:  # noqa: BLE001 - isolate the point: the sweep goes on
        value, error = None, one_line(exception)
        _keep_traceback(run_dir, exception)
    finally:
        _finish_open_wandb_run()
    if pruned is not None:
        print(f"pruned: point {run_dir.name} {pruned}", flush=True)
        write_record(run_dir, **base, status=PRUNED, objective=pruned.value, error=None, skipped=False,
                     steps=pruned.step, pruned_at_step=pruned.step)  # fmt: skip
        return f"{PRUNED_RETURN}{pruned}"
    if error:
        print(f"error: point {run_dir.name} failed: {error}", file=sys.stderr, flush=True)
        write_record(run_dir, **base, status=FAILED, objective=None, error=error, skipped=False)
        return f"failed: {error}"
    steps = _steps_trained(run_dir)
    write_record(
        run_dir, **base, status=FINISHED, objective=float(value), error=None, skipped=False, steps=steps
    )
    return float(value)


def _skip(run_dir: Path, previous: dict[str, Any], overrides: list[str]) -> Any:
    """A point done in an earlier attempt: say so, mark its record skipped, return what it returned."""
    if previous.get("status") == PRUNED:
        print(f"skip: point {run_dir.name} ({' '.join(overrides)}) was pruned before", flush=True)
        write_record(run_dir, **{**previous, "skipped": True})
        return f"{PRUNED_RETURN}at step {previous.get('pruned_at_step')} before"
    print(
        f"skip: point {run_dir.name} ({' '.join(overrides)}) already finished: {run_dir}/metrics.json",
        flush=True,
    )
    write_record(run_dir, **{**previous, "skipped": True})
    return previous.get("objective")


def _steps_trained(run_dir: Path) -> int | None:
    """The optimizer steps of a finished run (``perf/global_step`` in its metrics.json)."""
    try:
        return int(json.loads((run_dir / "metrics.json").read_text())["perf/global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _objective_problem(objective: str, value: Any) -> str | None:
    if value is None:
        return f"objective {objective} is not among the run's metrics (metrics.json)"
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"objective {objective} is {value}"
    return None


def _keep_traceback(run_dir: Path, exception: BaseException) -> None:
    """The full traceback goes to the point's traceback.txt (and stderr with HYDRA_FULL_ERROR=1)."""
    text = "".join(traceback.format_exception(type(exception), exception, exception.__traceback__))
    if _global_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "traceback.txt").write_text(text)
    if full_errors_requested():
        sys.stderr.write(text)


def _finish_open_wandb_run() -> None:
    """A point that failed before its loggers were closed must not leave its W&B run to the next point."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1)


# ------------------------------------------------------------------------------------ sets of records
def collect_records(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every point record under ``sweep_dir``, in job order; a running point whose dir another process
    holds now gets ``busy`` (who holds it)."""
    from lmexp.training.run_lock import holder_of

    records = [read_record(path.parent) for path in Path(sweep_dir).glob(f"*/{RECORD_NAME}")]
    records = sorted((r for r in records if r), key=lambda r: (r.get("num", 0), r.get("run_dir", "")))
    for record in records:
        holder = (
            holder_of(record["run_dir"])
            if record.get("status") == RUNNING and record.get("run_dir")
            else None
        )
        if holder is not None:
            record["busy"] = holder.describe()
    return records


def point_status(record: dict[str, Any]) -> str:
    """finished / pruned / failed / skipped (finished earlier) / busy (running now, in another process) /
    running (started and never ended: killed or preempted)."""
    if record.get("busy"):
        return BUSY
    return SKIPPED if record.get("status") == FINISHED and record.get("skipped") else str(record["status"])


def pruned_return(value: Any) -> bool:
    """Whether a point's return value says its trial was pruned."""
    return isinstance(value, str) and value.startswith(PRUNED_RETURN)


def best_of(
    items: Sequence[T], objective: Callable[[T], float | None], direction: str = "minimize"
) -> T | None:
    """The item with the best objective (None-valued ones left out); None when there is none."""
    scored = [item for item in items if objective(item) is not None]
    if not scored:
        return None
    return (min if direction == "minimize" else max)(scored, key=objective)


def best_record(records: Sequence[dict[str, Any]], direction: str = "minimize") -> dict[str, Any] | None:
    """The finished point with the best objective."""
    done = [r for r in records if r.get("status") == FINISHED]
    return best_of(done, lambda r: r.get("objective"), direction)


def override_values(record: dict[str, Any]) -> dict[str, str]:
    """A point's overrides as ``{key: value}`` (``+``/``~`` prefixes dropped)."""
    return override_strings.as_dict(record.get("overrides", []))


def swept_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """The override keys whose value differs between points (in first-seen order): what the sweep varies."""
    values = [override_values(r) for r in records]
    keys = list(dict.fromkeys(k for v in values for k in v))
    return [k for k in keys if len({v.get(k) for v in values}) > 1] or ([] if len(records) > 1 else keys)
