"""Distributed training on this CPU machine: real DDP and FSDP2 over gloo with 2 processes.

Every 2-process run starts real processes through the real CLI (about 10 s of start-up each), so the
runs are few and each feeds several assertions: a 2-point multirun with trainer=ddp_cpu (one gpt and one
bert point) is shared by the tests of this module.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from lmexp.cli import external_rank
from lmexp.config.settings import load_settings
from lmexp.errors import ConfigError
from lmexp.models.gpt import GPTConfig
from lmexp.train import train
from lmexp.training.checkpoints import load_checkpoint
from lmexp.training.perf import chip_of

WHOLE_VAL = "trainer.limit_val_batches=1.0"
# The whole validation split (debug=fast limits it to 4 batches per process, which differs by world size).
SINGLE_RUN_OPTIONS = [
    "callbacks.progress_bar=null", "callbacks.model_summary=null", "logger=[csv,wandb]", WHOLE_VAL
]  # fmt: skip
DEVICES = 2
BATCH = 8  # per process: the global batch is DEVICES x BATCH
FSDP_CPU = [
    "trainer=fsdp", "trainer.accelerator=cpu", f"trainer.devices={DEVICES}", "trainer.precision=32-true"
]  # fmt: skip


def lmexp_environment(cwd: Path, cache_dir: Path) -> dict[str, str]:
    """The environment of a command under test: the shared data cache, W&B offline in a private dir."""
    wandb_home = cwd / "wandb-home"
    env = {**os.environ, "LMEXP_CACHE_DIR": str(cache_dir), "WANDB_MODE": "offline"}
    env |= {
        "WANDB_CONFIG_DIR": str(wandb_home),
        "WANDB_CACHE_DIR": str(wandb_home),
        "WANDB_DATA_DIR": str(wandb_home),
    }
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_lmexp(cwd: Path, cache_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m lmexp.train <args>`` as a user runs it, W&B offline, in ``cwd``."""
    env = lmexp_environment(cwd, cache_dir)
    cwd.mkdir(parents=True, exist_ok=True)
    flags = [arg for arg in args if arg.startswith("-")]  # Hydra takes its flags before the overrides
    overrides = [arg for arg in args if not arg.startswith("-")]
    result = subprocess.run(
        [sys.executable, "-m", "lmexp.train", *flags, "debug=fast", *SINGLE_RUN_OPTIONS, *overrides],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def read_metrics(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def ddp_multirun(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    """One ``-m`` multirun of two points (gpt, bert), each trained by 2 DDP processes over gloo."""
    cwd = tmp_path_factory.mktemp("ddp")
    run_lmexp(cwd, cache_dir, "-m", "trainer=ddp_cpu", f"data.batch_size={BATCH}", "model=gpt,bert")
    sweeps = list((cwd / "outputs" / "multirun").iterdir())
    assert len(sweeps) == 1, "a relaunched rank ran a sweep of its own"
    assert not (cwd / "outputs" / "runs").exists(), "a relaunched rank started a run of its own"
    return {"cwd": cwd, "gpt": sweeps[0] / "0", "bert": sweeps[0] / "1"}


def assert_rank_zero_outputs(run_dir: Path) -> None:
    """One config, log, metrics file, CSV log and W&B run: rank 0's; nothing from the other rank."""
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "metrics.json").is_file()
    assert len(list(run_dir.rglob("metrics.csv"))) == 1
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    logs = list(run_dir.glob("*.log"))
    assert len(logs) == 1 and "GLOBAL_RANK: 1" not in logs[0].read_text()
    assert not list(run_dir.rglob("*.tmp"))


@pytest.mark.slow  # 2-process runs: ~10 s of start-up each
def test_ddp_multirun_matches_single_process(ddp_multirun, config, tmp_path):
    # Same global batch in one process: identical data (rank r takes every 2nd example of the same
    # order), averaged gradients, so the same weights up to float rounding.
    for model in ("gpt", "bert"):
        run_dir = ddp_multirun[model]
        assert_rank_zero_outputs(run_dir)
        ddp = read_metrics(run_dir)
        assert ddp["perf/global_step"] == 10
        assert ddp["perf/global_batch_size"] == DEVICES * BATCH
        assert ddp["perf/tokens_per_step"] == DEVICES * BATCH * 32  # debug=fast: data.block_size=32
        assert ddp["perf/tokens_per_sec"] > 0 and ddp["perf/flops_per_token"] > 0
        assert "perf/mfu" not in ddp  # a CPU has no peak in the table: MFU is left out, not invented
        global_batch = f"data.batch_size={DEVICES * BATCH}"
        single = train(config(f"model={model}", global_batch, WHOLE_VAL, run_dir=tmp_path / model))
        if model == "gpt":
            assert ddp["val/loss"] == pytest.approx(single["val/loss"], rel=1e-5)
            assert ddp["test/loss"] == pytest.approx(single["test/loss"], rel=1e-5)
        else:
            # Masked LM draws its training masks from a generator seeded by (seed, step, batch, rank), so
            # two ranks train on other masks than one process does: the same within sampling noise only.
            # (Evaluation masks do not depend on the layout; see the test below.)
            assert ddp["val/loss"] == pytest.approx(single["val/loss"], abs=0.15)


@pytest.mark.slow
def test_ddp_validation_equals_single_process_on_the_same_weights(ddp_multirun, config, tmp_path):
    # The final weights of the DDP run, evaluated by one process: the validation set is sharded without
    # padding or repeats and the metrics are synced by torchmetrics, so the value is the same.
    # For bert the evaluation masks are seeded by each sequence's tokens, so they agree too.
    for model in ("gpt", "bert"):
        run_dir = ddp_multirun[model]
        ddp = read_metrics(run_dir)
        last = run_dir / "checkpoints" / "last.ckpt"
        overrides = [f"model={model}", f"data.batch_size={BATCH}", f"ckpt_path={last}", WHOLE_VAL]
        single = train(config(*overrides, run_dir=tmp_path / model))
        assert single["perf/global_step"] == 10  # nothing trained: the checkpoint was at max_steps
        assert single["val/loss"] == pytest.approx(ddp["val/loss"], rel=1e-6)
        assert single["val/ppl"] == pytest.approx(ddp["val/ppl"], rel=1e-6)
        assert single["val/acc"] == pytest.approx(ddp["val/acc"], abs=1e-9)


def shard_chunks(sharded_checkpoint: Path) -> dict[str, list[tuple[list[int], list[int]]]]:
    """(offsets, sizes) of each saved shard of each model tensor of a distributed checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(sharded_checkpoint).read_metadata().state_dict_metadata
    return {
        key: [(list(chunk.offsets), list(chunk.sizes)) for chunk in value.chunks]
        for key, value in metadata.items()
        if key.startswith("state_dict.model.")
    }


@pytest.mark.slow  # 2-process runs: ~10 s of start-up each
def test_fsdp_trains_like_ddp_shards_resumes_and_exports(ddp_multirun, config, cache_dir, tmp_path):
    cwd = ddp_multirun["cwd"]
    first = tmp_path / "fsdp"
    # Train rows every 4 steps: the checkpoint of step 10 falls inside the window of steps 8-11.
    every_4 = "trainer.log_every_n_steps=4"
    run_lmexp(cwd, cache_dir, *FSDP_CPU, f"data.batch_size={BATCH}", every_4, f"hydra.run.dir={first}")
    assert_rank_zero_outputs(first)
    fsdp = read_metrics(first)
    ddp = read_metrics(ddp_multirun["gpt"])
    assert fsdp["val/loss"] == pytest.approx(ddp["val/loss"], rel=1e-5)

    # Really sharded: every parameter is saved as 2 shards, each rank's half of the rows.
    sharded = first / "checkpoints" / "last.ckpt"
    assert sharded.is_dir() and len(list(sharded.glob("*.distcp"))) == DEVICES
    chunks = shard_chunks(sharded)
    qkv = chunks["state_dict.model.blocks.0.attn.qkv.weight"]
    assert qkv == [([0, 0], [48, 32]), ([48, 0], [48, 32])]  # (3 * 32 rows) x 32 split in halves
    assert all(len(parts) == DEVICES for parts in chunks.values())

    # Loadable in one process, for eval and export: full tensors under the usual names.
    checkpoint = load_checkpoint(sharded)
    model = GPTConfig(**checkpoint["lmexp"]["model_config"]).build()
    state = checkpoint["state_dict"]
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    model.load_state_dict(weights)
    assert checkpoint["global_step"] == 10

    # Resume from the shards with activation checkpointing on and a full (one-file) checkpoint at the end;
    # the reference does the same in one process (10 steps, then resumed to 14).
    resumed = tmp_path / "fsdp_resumed"
    run_lmexp(
        cwd, cache_dir, *FSDP_CPU, f"data.batch_size={BATCH}", every_4, "trainer.max_steps=14",
        f"ckpt_path={sharded}", "trainer.strategy.activation_checkpointing=true",
        "trainer.strategy.state_dict=full", f"hydra.run.dir={resumed}",
    )  # fmt: skip
    reference_dir = tmp_path / "reference"
    batch = f"data.batch_size={DEVICES * BATCH}"
    train(config(batch, WHOLE_VAL, every_4, run_dir=reference_dir))
    reference_last = reference_dir / "checkpoints" / "last.ckpt"
    reference_resumed = tmp_path / "r"
    resume = f"ckpt_path={reference_last}"
    reference = train(
        config(batch, WHOLE_VAL, every_4, "trainer.max_steps=14", resume, run_dir=reference_resumed)
    )
    after = read_metrics(resumed)
    assert after["perf/global_step"] == 14
    assert after["val/loss"] == pytest.approx(reference["val/loss"], rel=1e-5)
    # The checkpoint keeps the train metrics of steps 8-9 summed over both ranks (as one process has them),
    # so the row of steps 8-11 averages all four, as in the reference.
    window = checkpoint["lmexp"]["train_window"]
    single = torch.load(reference_last, weights_only=True)["lmexp"]["train_window"]
    assert window.keys() == single.keys() and window["metrics.tokens.sum_value"] > 0
    for name in window:
        torch.testing.assert_close(window[name], single[name], rtol=1e-5, atol=0, msg=name)
    assert csv_row(resumed, 11)["train/loss"] == pytest.approx(
        csv_row(reference_resumed, 11)["train/loss"], rel=1e-5
    )
    full = resumed / "checkpoints" / "last.ckpt"
    assert full.is_file()
    full_weights = load_checkpoint(full)["state_dict"]
    assert full_weights["model.blocks.0.attn.qkv.weight"].shape == torch.Size([96, 32])  # gathered


def csv_row(run_dir: Path, step: int) -> dict[str, float]:
    """The train row of ``step`` in a run's CSV log."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/loss") and int(row["step"]) == step]
    assert len(rows) == 1, f"{run_dir}: {len(rows)} train rows at step {step}"
    return {key: float(value) for key, value in rows[0].items() if value}


@pytest.mark.slow  # 2-process runs: ~10 s of start-up each
def test_srun_ranks_come_from_slurm(ddp_multirun, cache_dir, tmp_path):
    # The multi-node recipe on one node: srun starts both ranks (tasks per node = devices), Lightning
    # takes ranks from SLURM's variables and relaunches nothing; rank 1 writes no Hydra output or log.
    from tests.sweeps import slurm_cluster as helpers

    # A short root: slurmstepd's sockets live under it, and a Unix socket path holds at most 107 bytes
    # (a test's own tmp dir under a pytest-xdist worker is longer than that allows).
    root = Path(tempfile.mkdtemp(prefix="slurm-"))
    try:
        cluster = helpers.start_cluster(root)
    except (helpers.ClusterUnavailable, OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"no SLURM cluster on this machine: {error}")
    run_dir = tmp_path / "run"
    try:
        srun = ["srun", "--nodes=1", f"--ntasks-per-node={DEVICES}", "--job-name=lmexp"]
        env = lmexp_environment(tmp_path, cache_dir) | {"SLURM_CONF": cluster.env["SLURM_CONF"]}
        result = subprocess.run(
            [*srun, sys.executable, "-m", "lmexp.train", "debug=fast", *SINGLE_RUN_OPTIONS, "trainer=ddp_cpu",
             f"data.batch_size={BATCH}", f"hydra.run.dir={run_dir}"],
            cwd=tmp_path, env=env,
            capture_output=True, text=True, timeout=400,
        )  # fmt: skip
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_rank_zero_outputs(run_dir)
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in (run_dir / "train.log").read_text()
    assert read_metrics(run_dir)["val/loss"] == pytest.approx(
        read_metrics(ddp_multirun["gpt"])["val/loss"], rel=1e-6
    )


def test_bad_fsdp_settings_are_one_config_error(config):
    bad = ["trainer.strategy.state_dict=both", "trainer.strategy.activation_checkpointing=3"]
    cfg = config("trainer=fsdp", *bad)
    with pytest.raises(ConfigError) as error:
        load_settings(cfg)
    assert "trainer.strategy.state_dict='both' is not one of sharded, full" in str(error.value)
    assert "trainer.strategy.activation_checkpointing=3: expected true or false" in str(error.value)


def test_external_rank_reads_the_cluster_variables(monkeypatch):
    for name in ("RANK", "SLURM_PROCID", "SLURM_NTASKS", "LMEXP_RANK_CONFIG", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert external_rank() == 0
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert external_rank() == 0  # a one-task SLURM job around one process has no other ranks
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert external_rank() == 3
    monkeypatch.setenv("RANK", "2")  # torchrun
    assert external_rank() == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize(
    "options",
    [
        ["trainer=gpu", "trainer.precision=16-mixed"],  # fp16 autocast with a gradient scaler
        ["trainer=fsdp", "trainer.precision=bf16-mixed"],  # all GPUs, sharded checkpoint directory
    ],
    ids=["gpu-16-mixed", "fsdp-bf16"],
)
@pytest.mark.slow
def test_gpu_checkpoints_round_trip(options, cache_dir, tmp_path):
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    run_lmexp(tmp_path, cache_dir, *options, f"hydra.run.dir={first}")
    last = first / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint(last)  # a file (gpu) or a shard directory (fsdp): both load
    assert checkpoint["global_step"] == 10
    run_lmexp(
        tmp_path, cache_dir, *options, "trainer.max_steps=14", f"ckpt_path={last}", f"hydra.run.dir={resumed}"
    )
    metrics = read_metrics(resumed)
    assert metrics["perf/global_step"] == 14
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert metrics["perf/peak_memory_gib"] > 0
    if chip_of(torch.cuda.get_device_name()):
        assert 0 < metrics["perf/mfu"] < 1


def test_fsdp_ranks_run_as_many_evaluation_batches_of_language_model_data_as_rank_0():
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    from lmexp.data.sampling import EvaluationBatches
    from lmexp.training.distributed import PADDING_KEY, FSDP2Strategy

    dataset = [{"x": torch.tensor(i)} for i in range(10)]
    groups = [list(range(5)), list(range(5, 8))]  # two sources: 5 and 3 blocks
    loaders = [DataLoader(dataset, batch_sampler=EvaluationBatches(groups, 2, rank, 2)) for rank in range(2)]
    strategy = SimpleNamespace(world_size=2)
    equal = [FSDP2Strategy.process_dataloader(strategy, loader) for loader in loaders]
    batches = [list(loader) for loader in equal]
    assert len(batches[0]) == len(batches[1]) == 3  # rank 0: 2 + 1 batches; rank 1: 1 + 1 and one padding
    assert [PADDING_KEY in b for b in batches[1]] == [False, False, True]
