"""DDP across two SLURM nodes: ``trainer.num_nodes=2 trainer.devices=1`` through ``srun`` and the launcher.

The cluster (``slurm_multinode``, tests/sweeps/slurm_cluster.py) is two hosts on this one machine, each in
its own network, UTS and mount namespaces, so SLURM, Lightning and gloo see two hosts: rank 1 on node2
reaches rank 0 only at node1's address, found by the name Lightning takes from SLURM_NODELIST. A Hydra
callback (tests/sweeps/rank_probe.py) records in each rank what Lightning's strategy read from SLURM.
The same two hosts also run the job without a scheduler, one command per host with Lightning's own
variables (NODE_RANK, WORLD_SIZE, MASTER_ADDR).

Each run is compared with one process training on the same global batch (2 x 8): the same data in the
same order, gradients averaged instead of summed over one batch, so the same metrics and weights up to
float rounding (as tests/test_distributed.py checks for two processes on one node).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmexp.cli import external_rank
from lmexp.training.checkpoints import load_checkpoint
from tests.conftest import REPO, TINY, make_config
from tests.sweeps.rank_probe import rank_probe_overrides, read_probes
from tests.sweeps.sweep_helpers import lmexp_env, records, sweep_args

NODES = 2
BATCH = 8  # per process
# debug=fast limits validation to a number of batches per process, which differs by world size
WHOLE_VAL = "trainer.limit_val_batches=1.0"
TWO_NODES = ["trainer=ddp_cpu", f"trainer.num_nodes={NODES}", "trainer.devices=1", f"data.batch_size={BATCH}"]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict:
    """One process, the global batch of the two nodes: its metrics and final weights."""
    from lmexp.train import train

    run_dir = tmp_path_factory.mktemp("single")
    # CSV only: this runs in the test process, outside the per-test W&B isolation, and the logger does
    # not change what is trained.
    cfg = make_config(run_dir, cache_dir, WHOLE_VAL, f"data.batch_size={NODES * BATCH}", "logger=[csv]")
    metrics = train(cfg)
    return {"metrics": metrics, "weights": model_weights(run_dir)}


def model_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    return {key: value for key, value in state.items() if key.startswith("model.")}


def job_env(cluster, cache_dir: Path, home: Path) -> dict[str, str]:
    """The environment of a job: W&B offline, the shared cache, this checkout importable (the probe)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return lmexp_env(cache_dir, home, {"SLURM_CONF": cluster.env["SLURM_CONF"], "PYTHONPATH": path})


def assert_two_nodes_joined(probes: dict[int, dict], environment: str = "SLURMEnvironment") -> None:
    """Global ranks 0 and 1 on node ranks 0 and 1, on hosts node1 and node2; only rank 0 wrote .hydra/."""
    assert sorted(probes) == [0, 1], probes
    for rank, host in ((0, "node1"), (1, "node2")):
        probe = probes[rank]
        assert probe["environment"] == environment
        assert probe["hostname"] == host
        assert (probe["node_rank"], probe["local_rank"], probe["world_size"]) == (rank, 0, NODES)
        assert probe["slurm_procid"] == (str(rank) if environment == "SLURMEnvironment" else None)
        assert probe["main_address"] == "node1"  # SLURM: the first host of SLURM_NODELIST
    assert probes[0]["output_subdir"] == ".hydra" and probes[1]["output_subdir"] is None


def assert_rank_zero_outputs(run_dir: Path) -> None:
    """One config, log, metrics file, CSV log and W&B run: rank 0's; nothing from the other rank."""
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "metrics.json").is_file()
    assert len(list(run_dir.rglob("metrics.csv"))) == 1
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    logs = list(run_dir.glob("*.log"))
    assert len(logs) == 1 and "GLOBAL_RANK: 1" not in logs[0].read_text()
    assert not list(run_dir.rglob("*.tmp"))


def assert_same_as_single_process(run_dir: Path, single: dict) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["perf/global_step"] == 10
    assert metrics["perf/global_batch_size"] == NODES * BATCH
    for name in ("val/loss", "val/ppl", "test/loss"):
        assert metrics[name] == pytest.approx(single["metrics"][name], rel=1e-5), name
    # Adam scales each gradient by its own running size, so a weight whose true gradient is zero (the
    # attention's key bias: softmax ignores a shift shared by all keys) moves by rounding noise blown up
    # towards the learning rate (3e-3 here): compare with an absolute tolerance far below one step.
    weights = model_weights(run_dir)
    assert weights.keys() == single["weights"].keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, single["weights"][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow  # a cluster and two training processes
def test_srun_trains_across_two_nodes_like_one_process(slurm_multinode, single_process, cache_dir, tmp_path):
    run_dir, probes = tmp_path / "run", tmp_path / "probes"
    srun = ["srun", f"--nodes={NODES}", "--ntasks-per-node=1", "--label", "--job-name=lmexp"]
    train = [sys.executable, "-m", "lmexp.train", *TINY, WHOLE_VAL, *TWO_NODES, f"hydra.run.dir={run_dir}"]
    result = subprocess.run(
        slurm_multinode.command(*srun, *train, *rank_probe_overrides(probes)),
        cwd=tmp_path, env=job_env(slurm_multinode, cache_dir, tmp_path / "wandb-home"),
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stderr[-4000:]}\n{slurm_multinode.log_tail()}"
    assert_two_nodes_joined(read_probes(probes))
    assert_rank_zero_outputs(run_dir)
    assert_same_as_single_process(run_dir, single_process)


@pytest.mark.slow  # a cluster and two training processes
def test_the_slurm_launcher_runs_a_point_on_two_nodes(slurm_multinode, single_process, cache_dir, tmp_path):
    probes = tmp_path / "probes"
    args = sweep_args(
        tmp_path / "out", "two-nodes", "hydra/launcher=slurm", "hydra.launcher.timeout_min=10",
        "hydra.launcher.signal_delay_s=30", WHOLE_VAL, *TWO_NODES, *rank_probe_overrides(probes),
    )  # fmt: skip
    result = subprocess.run(
        slurm_multinode.command(sys.executable, "-m", "lmexp.train", *args),
        cwd=tmp_path, env=job_env(slurm_multinode, cache_dir, tmp_path / "wandb-home"),
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    sweep_dir = tmp_path / "out" / "multirun" / "two-nodes"
    assert result.returncode == 0, f"{result.stderr[-4000:]}\n{slurm_multinode.log_tail()}"
    # The job's allocation follows the trainer: 2 nodes x 1 task.
    script = next((sweep_dir / ".submitit").rglob("*_submission.sh")).read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script
    assert_two_nodes_joined(read_probes(probes))
    point = records(sweep_dir)
    assert list(point) == [0] and point[0]["status"] == "finished"
    assert_rank_zero_outputs(sweep_dir / "0")
    assert_same_as_single_process(sweep_dir / "0", single_process)


@pytest.mark.slow  # a cluster and two training processes
def test_lightning_variables_train_across_two_hosts_like_one_process(
    slurm_multinode, single_process, cache_dir, tmp_path
):
    # No scheduler: one command per host with Lightning's own variables (its "general purpose cluster"),
    # on the cluster's two hosts. Only node1's process is global rank 0.
    run_dir, probes = tmp_path / "run", tmp_path / "probes"
    train = [sys.executable, "-m", "lmexp.train", *TINY, WHOLE_VAL, *TWO_NODES, f"hydra.run.dir={run_dir}"]
    env = job_env(slurm_multinode, cache_dir, tmp_path / "wandb-home")
    env |= {"MASTER_ADDR": "node1", "MASTER_PORT": "29500", "WORLD_SIZE": str(NODES)}
    processes = [
        subprocess.Popen(
            [*slurm_multinode.hosts[host].enter(), *train, *rank_probe_overrides(probes)],
            cwd=tmp_path,
            env=env | {"NODE_RANK": str(node_rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for node_rank, host in enumerate(("node1", "node2"))
    ]
    try:
        outputs = [process.communicate(timeout=400)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert [p.returncode for p in processes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert_two_nodes_joined(read_probes(probes), environment="LightningEnvironment")
    assert_rank_zero_outputs(run_dir)
    assert_same_as_single_process(run_dir, single_process)


def test_external_rank_of_a_node_started_with_lightning_variables(monkeypatch):
    for name in ("RANK", "SLURM_PROCID", "SLURM_NTASKS", "LMEXP_RANK_CONFIG", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NODE_RANK", "0")
    assert external_rank() == 0
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert external_rank() == 1
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert external_rank() > 0  # not rank 0: writes no .hydra/, log file, CSV or W&B run
    monkeypatch.setenv("RANK", "3")  # torchrun's exact global rank comes first
    assert external_rank() == 3
