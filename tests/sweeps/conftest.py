"""Fixtures for sweep tests: a work dir and environment per module, and a real SLURM cluster."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig

from tests.sweeps.slurm_cluster import ClusterUnavailable, start_cluster, start_multinode_cluster
from tests.sweeps.sweep_helpers import lmexp_env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sweep")


@pytest.fixture(scope="module")
def env(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return lmexp_env(cache_dir, tmp_path_factory.mktemp("wandb-home"))


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A one-node SLURM cluster under a temp dir for the module's tests; skips when it cannot start here."""
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except (ClusterUnavailable, OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"no SLURM cluster on this machine: {error}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def slurm_multinode(tmp_path_factory: pytest.TempPathFactory):
    """A SLURM cluster of two hosts (node1, node2) and a head host, each in its own namespaces, for the
    module's tests; skips when it cannot start here. Clients run on the head: ``cluster.command(...)``."""
    try:
        cluster = start_multinode_cluster(tmp_path_factory.mktemp("slurm-multinode"), nodes=2)
    except (ClusterUnavailable, OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"no multi-node SLURM cluster on this machine: {error}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(autouse=True)
def _forget_hydra_state():
    """Tests that set Hydra's job state (a sweep's point, a plan) must not leak it to later tests."""
    yield
    HydraConfig.instance().cfg = None
