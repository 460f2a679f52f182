"""Preemption on a real one-node SLURM cluster: SIGUSR1 -> checkpoint -> ``scontrol requeue`` -> resume.

The batch script is what the README recommends for a single run on SLURM: a run dir named after the job
(stable across requeues) and ``resume=auto``. ``scancel --signal=USR1`` delivers the signal SLURM sends
ahead of a time limit or preemption (``#SBATCH --signal=USR1@<seconds>``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY

MAX_STEPS = 150


def _batch_script(workdir: Path) -> str:
    overrides = [
        *TINY,
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.val_check_interval=50",
        "callbacks.checkpoint.every_n_train_steps=100000",  # the checkpoint on disk is the signal's
        f"hydra.run.dir={workdir}/runs/job-$SLURM_JOB_ID",
        "resume=auto",
    ]
    quoted = " ".join(f'"{o}"' for o in overrides)  # double quotes: bash expands $SLURM_JOB_ID
    return "\n".join(
        [
            "#!/bin/bash",
            "#SBATCH --requeue",
            "#SBATCH --open-mode=append",
            f"#SBATCH --output={workdir}/job-%j.out",
            'echo "start restart=${SLURM_RESTART_COUNT:-0}"',
            f"srun {sys.executable} -m lmexp.train {quoted} 2>&1",
            "",
        ]
    )


def _wait(condition, timeout: float, what: str, cluster) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{cluster.log_tail()}"
        time.sleep(0.2)


@pytest.mark.slow
def test_sigusr1_checkpoints_requeues_and_the_requeued_job_resumes(slurm_cluster, workdir, env):
    script = workdir / "train.sbatch"
    script.write_text(_batch_script(workdir))
    job_env = env | {"SLURM_CONF": slurm_cluster.env["SLURM_CONF"]}
    submitted = slurm_cluster.run("sbatch", "--parsable", str(script))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    run_dir, output = workdir / "runs" / f"job-{job_id}", workdir / f"job-{job_id}.out"
    slurm_cluster.env.update(job_env)  # sbatch exports the submitting environment to the job

    _wait(lambda: (run_dir / "csv" / "metrics.csv").exists(), 240, "training to start", slurm_cluster)
    signalled = slurm_cluster.run("scancel", "--signal=USR1", job_id)
    assert signalled.returncode == 0, signalled.stderr

    _wait(lambda: (run_dir / "metrics.json").exists(), 300, "the requeued job to finish", slurm_cluster)
    log = output.read_text()
    assert "start restart=0" in log and "start restart=1" in log, log[-3000:]
    stop = next(line for line in log.splitlines() if "stopping on SIGUSR1 at step" in line)
    stopped_at = int(stop.split("at step ")[1].split(";")[0])
    assert 0 < stopped_at < MAX_STEPS and "checkpoint saved to" in stop
    assert f"(step {stopped_at})" in log.split("start restart=1", 1)[1]  # resume=auto: continuing from ...
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["perf/global_step"] == MAX_STEPS
    # One W&B run across both attempts.
    run_ids = {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert len(run_ids) == 1
