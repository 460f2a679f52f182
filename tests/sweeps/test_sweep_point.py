"""One point of a sweep, in process: skip, forced re-run, failure isolation, the exit status, W&B identity,
and the resumable Optuna study.

The training itself is replaced by small task functions here (the end-to-end runs are in
test_sweep_grid.py); what is tested is the real point logic of lmexp.sweeps around them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lmexp.config.compose import compose_job
from lmexp.errors import ConfigError
from lmexp.sweeps.point import read_record, run_point, sweep_point, write_record
from lmexp.sweeps.summary import SweepCallback
from lmexp.training.loggers import run_identity


def point_config(
    run_dir: Path, *overrides: str, mode: RunMode = RunMode.MULTIRUN, num: int = 0
) -> DictConfig:
    """The config a job of a sweep sees, with Hydra's job state set as a launcher sets it."""
    return compose_job(["sweep.name=unit", *overrides], run_dir, job_num=num, mode=mode)


class FakeTraining:
    """Stands in for training: writes metrics.json like a run and returns the objective."""

    def __init__(self, value: float = 1.5) -> None:
        self.value, self.calls, self.seen = value, 0, []

    def __call__(self, cfg: DictConfig) -> float:
        self.calls += 1
        self.seen.append(OmegaConf.to_container(cfg))
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text(json.dumps({"val/loss": self.value}))
        return self.value


def test_a_finished_point_is_skipped_and_rerun_true_trains_it_from_scratch(tmp_path, capsys):
    training = FakeTraining()
    assert run_point(training, point_config(tmp_path, "optim.lr=0.01")) == 1.5
    assert read_record(tmp_path)["status"] == "finished"

    assert run_point(training, point_config(tmp_path, "optim.lr=0.01")) == 1.5
    assert training.calls == 1
    assert (
        f"skip: point {tmp_path.name} (sweep.name=unit optim.lr=0.01) already finished"
        in capsys.readouterr().out
    )

    assert run_point(training, point_config(tmp_path, "optim.lr=0.01", "sweep.rerun=true")) == 1.5
    assert training.calls == 2
    assert training.seen[-1]["resume"] == "never"  # not a resume from the final checkpoint

    # The same dir with other overrides is another point: it runs.
    run_point(training, point_config(tmp_path, "optim.lr=0.02"))
    assert training.calls == 3


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (ConfigError("model.n_head=3 does not divide model.n_embd=32"), "model.n_head=3 does not divide"),
        (RuntimeError("CUDA out of memory"), "RuntimeError: CUDA out of memory"),
    ],
)
def test_a_failing_point_is_recorded_and_does_not_raise(tmp_path, capsys, failure, expected):
    def failing(cfg: DictConfig) -> float:
        raise failure

    value = run_point(failing, point_config(tmp_path))
    assert isinstance(value, str) and value.startswith("failed: ")
    with pytest.raises(ValueError):
        float(value)  # the Optuna sweeper marks such a trial failed instead of learning from a fake number
    record = read_record(tmp_path)
    assert record["status"] == "failed" and expected in record["error"]
    assert f"error: point {tmp_path.name} failed: {expected}" in capsys.readouterr().err
    assert "Traceback" in (tmp_path / "traceback.txt").read_text()


def test_a_nan_objective_is_a_failed_point(tmp_path):
    assert run_point(FakeTraining(math.nan), point_config(tmp_path)).startswith(
        "failed: objective val/loss is nan"
    )
    assert read_record(tmp_path)["status"] == "failed"


def test_outside_a_sweep_the_task_runs_untouched(tmp_path):
    @sweep_point
    def failing(cfg: DictConfig) -> float:
        raise ConfigError("bad")

    with pytest.raises(ConfigError):
        failing(point_config(tmp_path, mode=RunMode.RUN))
    assert read_record(tmp_path) is None


def test_outside_a_sweep_a_pruned_run_ends_quietly(tmp_path, capsys):
    # The DDP ranks Lightning starts for a trial's job run without Hydra's sweep: rank 0 records the point.
    from lmexp.errors import TrialPruned

    @sweep_point
    def pruned(cfg: DictConfig) -> float:
        raise TrialPruned("val/loss", 7.5, 5)

    assert pruned(point_config(tmp_path, mode=RunMode.RUN)) is None
    assert "pruned: pruned at step 5: val/loss=7.5000" in capsys.readouterr().out
    assert read_record(tmp_path) is None


def _sweep(sweep_dir: Path, statuses: list[str]) -> DictConfig:
    for num, status in enumerate(statuses):
        objective = None if status == "failed" else 1.0 + num
        run_dir = sweep_dir / str(num)
        write_record(run_dir, num=num, status=status, objective=objective, overrides=[f"x={num}"],
                     run_dir=str(run_dir), objective_name="val/loss", error=None)  # fmt: skip
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}})


def test_the_sweep_exits_non_zero_only_when_every_point_failed(tmp_path, capsys):
    callback = SweepCallback(report=False)
    callback.on_multirun_start(config=OmegaConf.create())
    callback.on_multirun_end(config=_sweep(tmp_path / "some", ["failed", "finished"]))
    summary = json.loads((tmp_path / "some" / "summary.json").read_text())
    assert summary["best"] == 1 and len(summary["points"]) == 2
    assert "1 finished, 1 failed; best: point 1" in capsys.readouterr().out

    with pytest.raises(SystemExit) as stop:
        callback.on_multirun_end(config=_sweep(tmp_path / "all", ["failed", "failed"]))
    assert stop.value.code == 1
    assert "error: all 2 points of the sweep failed" in capsys.readouterr().err


def test_a_point_joins_the_sweep_group_with_its_overrides_as_tags(tmp_path):
    point_config(tmp_path, "optim.lr=0.01", "paths.output_dir=/x", "logger=[csv,wandb]")
    group, tags, job_type = run_identity(None, ["mine"], None, "unit")
    assert (group, job_type) == ("unit", "sweep")
    assert tags == ["mine", "optim.lr=0.01"]  # sweep.*, paths.* and logger only place the run

    point_config(tmp_path, "optim.lr=0.01", mode=RunMode.RUN)
    assert run_identity(None, [], None, "unit") == (None, [], "train")


def test_a_resumed_optuna_study_counts_the_trials_it_holds(tmp_path):
    import optuna
    from optuna.trial import TrialState

    from hydra_plugins.lmexp_sweep.optuna_sweeper import continue_study

    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(storage=storage, study_name="s")
    for value in (3.0, 2.0):
        trial = study.ask()
        study.tell(trial, value)
    pruned = study.ask()
    study.tell(pruned, state=TrialState.PRUNED)
    study.ask()  # left RUNNING, as by an interrupted sweep

    to_go, next_job = continue_study(optuna.load_study(study_name="s", storage=storage), n_trials=6)
    assert (to_go, next_job) == (2, 4)  # 4 trials used; new jobs are numbered after them
    states = [t.state for t in optuna.load_study(study_name="s", storage=storage).trials]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]


def test_an_interrupted_point_resumes_and_anything_else_in_its_dir_starts_afresh(tmp_path):
    training = FakeTraining()
    interrupted = {"num": 0, "status": "running", "overrides": ["sweep.name=unit", "optim.lr=0.01"]}
    write_record(tmp_path, **interrupted)
    run_point(training, point_config(tmp_path, "optim.lr=0.01"))
    assert training.seen[-1]["resume"] == "auto"  # continues from its own checkpoints

    write_record(tmp_path, **{**interrupted, "overrides": ["sweep.name=unit", "optim.lr=0.5"]})
    run_point(training, point_config(tmp_path, "optim.lr=0.01"))
    assert training.seen[-1]["resume"] == "never"  # another point's checkpoints

    write_record(tmp_path, **{**interrupted, "status": "failed"})
    run_point(training, point_config(tmp_path, "optim.lr=0.01"))
    assert training.seen[-1]["resume"] == "never"  # a failed attempt is not continued


def test_a_pruned_point_is_recorded_as_pruned_and_stays_pruned_when_the_sweep_runs_again(tmp_path, capsys):
    from lmexp.errors import TrialPruned
    from lmexp.sweeps.point import pruned_return

    def pruned(cfg: DictConfig) -> float:
        raise TrialPruned("val/loss", 7.5, 5)

    value = run_point(pruned, point_config(tmp_path, "optim.lr=3.0"))
    assert pruned_return(value)  # the Optuna sweeper leaves its trial PRUNED, not FAIL
    record = read_record(tmp_path)
    assert (record["status"], record["objective"], record["pruned_at_step"], record["error"]) == (
        "pruned", 7.5, 5, None
    )  # fmt: skip
    assert f"pruned: point {tmp_path.name} pruned at step 5: val/loss=7.5000" in capsys.readouterr().out

    training = FakeTraining()
    assert pruned_return(run_point(training, point_config(tmp_path, "optim.lr=3.0")))
    assert training.calls == 0 and read_record(tmp_path)["status"] == "pruned"
    assert "was pruned before" in capsys.readouterr().out


def test_the_other_ranks_of_a_point_follow_rank_zeros_decision_of_this_attempt(tmp_path, monkeypatch):
    # The race of a rerun: rank 0 found a failed attempt, chose to start afresh and wrote RUNNING; rank 1
    # reads that record afterwards. Taken for an interrupted attempt, it would resume old checkpoints.
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    overrides = ["sweep.name=unit", "optim.lr=0.01"]
    rank_zero = {"num": 0, "status": "running", "overrides": overrides, "resume": "never"}
    training = FakeTraining()

    write_record(tmp_path, **rank_zero, attempt="slurm:41.0:0")  # as rank 0 wrote it (rank 1 writes none)
    monkeypatch.setenv("SLURM_PROCID", "1")
    run_point(training, point_config(tmp_path, "optim.lr=0.01"))
    assert training.seen[-1]["resume"] == "never"  # rank 0's decision, not a resume

    monkeypatch.setenv("SLURM_PROCID", "0")
    write_record(tmp_path, **rank_zero, attempt="slurm:41.0:0")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeue: the record is an interrupted attempt
    monkeypatch.setenv("SLURM_PROCID", "1")
    run_point(training, point_config(tmp_path, "optim.lr=0.01"))
    assert training.seen[-1]["resume"] == "auto"


def test_rank_zero_writes_its_decision_and_attempt_into_the_running_record(tmp_path, monkeypatch):
    monkeypatch.setenv("LMEXP_ATTEMPT_ID", "try-7")
    seen = []

    def training(cfg: DictConfig) -> float:
        seen.append(read_record(tmp_path))
        return FakeTraining()(cfg)

    write_record(tmp_path, num=0, status="failed", overrides=["sweep.name=unit"], error="boom")
    run_point(training, point_config(tmp_path))
    assert (seen[0]["status"], seen[0]["attempt"], seen[0]["resume"]) == ("running", "try-7", "never")


@pytest.mark.parametrize("stored", [True, False])
def test_the_sweeper_reads_its_study_afresh_from_storage_and_keeps_one_in_memory(tmp_path, stored):
    from types import SimpleNamespace

    from hydra_plugins.lmexp_sweep.optuna_sweeper import study_loader
    from lmexp.sweeps.pruning import read_pruning

    impl = SimpleNamespace(
        storage=f"sqlite:///{tmp_path}/optuna.db" if stored else None,
        study_name="s",
        config=OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}),
    )
    study = study_loader(impl, None, read_pruning({}), ["minimize"])
    asked = study().ask()
    study().tell(asked.number, 1.0)  # as a trial's job and the sweeper's next batch see the study
    assert [t.state.name for t in study().trials] == ["COMPLETE"]
    assert (study() is study()) is not stored
