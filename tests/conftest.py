"""Shared fixtures: compose the real ``conf/train.yaml`` with tiny settings, isolate caches and W&B."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

# pytest-xdist runs one worker per core, and torch gives each process one OpenMP thread per core: two
# workers (and the runs they start) then keep more busy threads than there are cores, and every parallel
# region waits at its barrier for a thread the OS has put aside, which makes tiny models many times slower.
# Under several workers every test process (and, through the environment, every process it starts) uses one
# thread. Set before torch is imported (below, through Lightning), as OpenMP reads it once.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from lmexp.config.compose import compose_job

REPO = Path(__file__).resolve().parent.parent

# A run of a few seconds on 2 CPU cores; tests add what they need on top.
TINY = [
    "debug=fast",
    "logger=[csv,wandb]",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
]


def wandb_records(offline_run: Path) -> list[dict]:
    """The records of an offline W&B run dir, read back with W&B's own reader (no network)."""
    result = subprocess.run(
        [str(Path(sys.executable).with_name("wandb")), "leet", "inspect", "--json", str(offline_run)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


class CrashAtStep(Callback):
    """Simulates a crash: raises once the trainer has finished ``step`` optimizer steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError("simulated crash")


class KillAfterCheckpoint(Callback):
    """Kills the whole job with SIGKILL right after the checkpoint of ``step`` is on disk.

    ModelCheckpoint writes in ``on_train_batch_end``, and Lightning logs that step's metrics only after
    every hook of it has run, so this is the moment where the newest checkpoint is ahead of the log on disk.
    The LightningModule's hook runs after all callbacks' hooks, so it is wrapped here.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_fit_start(self, trainer, pl_module) -> None:
        after_callbacks = pl_module.on_train_batch_end

        def kill_after_checkpoint(*args, **kwargs):
            if trainer.global_step == self.step:
                os.killpg(os.getpgid(0), signal.SIGKILL)  # the job and its helpers, as a scheduler does
            return after_callbacks(*args, **kwargs)

        pl_module.on_train_batch_end = kill_after_checkpoint


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb_home = tmp_path_factory.mktemp("wandb-home")
    monkeypatch.setenv("WANDB_MODE", "offline")  # never reach the network from tests
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(wandb_home))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(wandb_home))
    monkeypatch.setenv("WANDB_DATA_DIR", str(wandb_home))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    # W&B records its service's address in os.environ once a run starts in this process; a child process
    # that inherits it registers its runs with our service, so a child killed with -9 leaves its run held
    # there for the rest of the session. Each child must start its own service, as a real job does.
    os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data cache for the whole session, so the tiny corpus and tokenizer are built once."""
    return tmp_path_factory.mktemp("cache")


def make_config(run_dir: Path, cache: Path, *overrides: str, tiny: bool = True) -> DictConfig:
    """Compose conf/train.yaml as the CLI would, with ``run_dir`` as Hydra's output dir."""
    return compose_job([*(TINY if tiny else []), f"paths.cache_dir={cache}", *overrides], run_dir)


@pytest.fixture
def config(tmp_path: Path, cache_dir: Path):
    """``config(*overrides, run_dir=..., tiny=True)`` -> a composed config writing into a fresh run dir."""

    def _make(*overrides: str, run_dir: Path | None = None, tiny: bool = True) -> DictConfig:
        return make_config(run_dir or tmp_path / "run", cache_dir, *overrides, tiny=tiny)

    return _make


@pytest.fixture(scope="session")
def zygote():
    """A warm interpreter that forks a child per command (tests/zygote.py), started on first use."""
    from tests.zygote import Zygote

    server: list[Zygote] = []

    def _get() -> Zygote:
        if not server:
            server.append(Zygote())
        return server[0]

    yield _get
    for started in server:
        started.close()


@pytest.fixture
def cli(tmp_path: Path, cache_dir: Path, zygote):
    """``cli("lmexp.train", *overrides)`` runs ``python -m ...`` as a user would, in a fresh directory.

    ``forked=True`` runs it as a child forked from a warm interpreter (tests/zygote.py): a real process
    without the ~12 s of imports; for cases that stop at a bad input before any work.
    """

    def _run(
        *args: str, env: dict | None = None, timeout: int = 300, forked: bool = False
    ) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "LMEXP_CACHE_DIR": str(cache_dir), **(env or {})}
        if forked:
            return zygote().run(list(args), tmp_path, full_env, timeout)
        return subprocess.run(
            [sys.executable, "-m", *args],
            cwd=tmp_path,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return _run


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """``hf_model_dir("gpt2")`` -> a directory holding a tiny saved transformers model of that family (gpt2,
    llama, qwen2, bert) and its tokenizer, built once per session (tests/models/hf_helpers.py)."""
    from tests.models.hf_helpers import save_tiny_model

    made: dict[str, Path] = {}

    def _get(family: str) -> Path:
        if family not in made:
            made[family] = save_tiny_model(tmp_path_factory.mktemp(f"hf-{family}"), family)
        return made[family]

    return _get
