"""End-to-end training: through Hydra's compose API and through the real CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lmexp.train import train
from tests.conftest import CrashAtStep

EXPECTED_KEYS = {
    "val/loss", "val/ppl", "val/acc", "val/bpb", "val/bpw", "val/bpw_floor",
    "test/loss", "test/ppl", "test/acc", "test/bpb", "test/bpw", "perf/tokens_per_sec",
}  # fmt: skip


def read_csv_metric(run_dir: Path, key: str) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return [float(row[key]) for row in csv.DictReader(handle) if row.get(key)]


@pytest.mark.slow
def test_short_run_learns_and_writes_outputs(config, tmp_path):
    run_dir = tmp_path / "run"
    metrics = train(config("trainer.max_steps=40", "trainer.val_check_interval=20"))

    assert EXPECTED_KEYS <= set(metrics)
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == pytest.approx(metrics)
    train_loss = read_csv_metric(run_dir, "train/loss")
    assert len(train_loss) >= 3 and train_loss[-1] < train_loss[0] - 0.5  # it learns
    val_loss = read_csv_metric(run_dir, "val/loss")
    assert val_loss[-1] < val_loss[0]
    assert metrics["val/ppl"] == pytest.approx(2.718281828 ** metrics["val/loss"], rel=1e-4)
    assert metrics["val/bpw"] > metrics["val/bpw_floor"] > 0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("best-step*.ckpt"))
    wandb_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert wandb_files and wandb_files[0].stat().st_size > 0
    assert not list(run_dir.rglob("*.tmp"))


@pytest.mark.slow
def test_same_seed_same_result(config, tmp_path):
    first = train(config("trainer.max_steps=12", run_dir=tmp_path / "a"))
    second = train(config("trainer.max_steps=12", run_dir=tmp_path / "b"))
    third = train(config("trainer.max_steps=12", "seed=7", run_dir=tmp_path / "c"))
    assert first["val/loss"] == second["val/loss"]
    assert first["val/loss"] != third["val/loss"]


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(config, tmp_path):
    # Dropout on, so that the random state has to be restored too; the epoch is long, so the
    # restart lands mid-epoch and the data position has to be restored.
    common = ["trainer.max_steps=16", "model.dropout=0.1", "callbacks.checkpoint.every_n_train_steps=4"]
    reference = train(config(*common, run_dir=tmp_path / "ref"))

    crashed_dir = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(*common, run_dir=crashed_dir), extra_callbacks=[CrashAtStep(10)])
    last = crashed_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()

    resumed = train(config(*common, f"ckpt_path={last}", run_dir=tmp_path / "resumed"))
    assert resumed["perf/global_step"] == 16
    assert resumed["val/loss"] == pytest.approx(reference["val/loss"], abs=1e-6)


@pytest.mark.slow
def test_cli_run(cli, tmp_path):
    result = cli("lmexp.train", "debug=fast", "trainer.max_steps=20")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = list((tmp_path / "outputs" / "runs").glob("*/*"))
    assert len(run_dirs) == 1
    run_dir = run_dirs[0]
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert EXPECTED_KEYS <= set(metrics)
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert "run summary" in result.stdout and str(run_dir.name) in result.stdout


@pytest.mark.slow
def test_cli_help_and_cfg_job(cli):
    help_text = cli("lmexp.train", "--help")
    model_dir = Path(__file__).parents[2] / "conf" / "model"
    shipped_models = sorted(path.stem for path in model_dir.glob("*.yaml"))
    assert help_text.returncode == 0 and "model: " + ", ".join(shipped_models) in help_text.stdout
    job = cli("lmexp.train", "--cfg", "job", "model.n_layer=6", "optim.lr=1e-3")
    assert job.returncode == 0
    assert "n_layer: 6" in job.stdout and "lr: 0.001" in job.stdout


@pytest.mark.slow
def test_user_text_with_explicit_split_files(config, tmp_path):
    from lmexp.data.corpus import GrammarConfig, build_grammar, generate_documents

    docs = generate_documents(build_grammar(GrammarConfig()), 400, seed=3)
    train_file, val_file, test_file = tmp_path / "train.txt", tmp_path / "val.jsonl", tmp_path / "test.txt"
    train_file.write_text("\n\n".join(docs[:340]) + "\n")
    val_file.write_text("\n".join(json.dumps({"text": d}) for d in docs[340:370]) + "\n")
    test_file.write_text("\n\n".join(docs[370:]) + "\n")
    metrics = train(
        config(
            "data=text",
            f"data.path={train_file}",
            f"data.val_path={val_file}",
            f"data.test_path={test_file}",
            "tokenizer=unigram",
            "logger=[csv,tensorboard]",
            "trainer.max_steps=10",
        )
    )
    assert {"val/loss", "val/bpb", "val/bpw", "test/loss", "test/bpb"} <= set(metrics)
    assert "val/bpw_floor" not in metrics  # only the built-in corpus has a known floor
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
