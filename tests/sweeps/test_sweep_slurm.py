"""A sweep submitted to a real one-node SLURM cluster through ``hydra/launcher=slurm`` (submitit).

The cluster (tests/sweeps/slurm_cluster.py) is started for this module from Debian's slurm-wlm, installed
when missing and allowed; where it cannot run, the test is skipped with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.sweeps.sweep_helpers import records, run_lmexp, sweep_args


@pytest.mark.slow
def test_a_sweep_runs_as_slurm_jobs(slurm_cluster, workdir: Path, env: dict[str, str]):
    args = sweep_args(
        workdir / "out",
        "slurm",
        "hydra/launcher=slurm",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.signal_delay_s=30",
        "optim.lr=1e-3,3e-3",
    )
    result = run_lmexp("train", *args, cwd=workdir, env=env | {"SLURM_CONF": slurm_cluster.env["SLURM_CONF"]})
    sweep_dir = workdir / "out" / "multirun" / "slurm"
    assert result.returncode == 0, f"{result.stderr[-3000:]}\n{slurm_cluster.log_tail()}"
    points = records(sweep_dir)
    assert sorted(points) == [0, 1] and {p["status"] for p in points.values()} == {"finished"}
    for num in (0, 1):
        metrics = json.loads((sweep_dir / str(num) / "metrics.json").read_text())
        assert metrics["perf/global_step"] == 10
        assert points[num]["objective"] == metrics["val/loss"]
    # They really ran as SLURM jobs: submitit's sbatch script and the job logs are in the sweep dir.
    scripts = list((sweep_dir / ".submitit").rglob("*_submission.sh"))
    assert scripts and "#SBATCH --requeue" in scripts[0].read_text()
    assert "#SBATCH --ntasks-per-node=1" in scripts[0].read_text()  # = trainer.devices
    assert "sweep: 2 finished" in result.stdout
