"""model=hf through what lmexp's own models go through: DDP, a sweep, kill -9 and exact resume, bf16-mixed,
torch.compile, lmexp.eval, lmexp.generate (the model's own KV cache) and W&B offline.

The runs are few and shared (module-scoped): one 2-point ``-m`` grid whose points each train in 2 DDP
processes over gloo (a tiny Llama), one GPT-2 run killed with SIGKILL and resumed beside its twin that ran
through (eval, generate and W&B then read the twin), and single-process references run in this process.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmexp.train import train
from tests.conftest import REPO, make_config, wandb_records
from tests.models.hf_helpers import POSITIONS
from tests.sweeps.sweep_helpers import records
from tests.training.test_distributed import (
    DEVICES,
    SINGLE_RUN_OPTIONS,
    assert_rank_zero_outputs,
    lmexp_environment,
    read_metrics,
    run_lmexp,
)
from tests.training.test_reliability import _assert_same_result, _step

# debug=fast sizes lmexp's own kinds (model.n_layer, model.n_embd); a model=hf run takes its model's sizes.
HF = ["model=hf", "~model.n_layer", "~model.n_embd"]
BATCH = 4  # per DDP process; the single-process reference takes DEVICES x BATCH
LRS = ("3e-3", "1e-3")  # the sweep's grid; the first is the single-process reference's
# The killed run: dropout on (the random state must come back), checkpoints every 7 steps, killed with
# SIGKILL right after the one of step 14 is on disk, mid-epoch (the whole run is in the first epoch).
KILLED_RUN = [
    "trainer.max_steps=30",
    "trainer.val_check_interval=10",
    "callbacks.checkpoint.every_n_train_steps=7",
    "model.config_overrides={resid_pdrop:0.1,embd_pdrop:0.1,attn_pdrop:0.1}",
]
KILL = ["+callbacks.kill._target_=tests.conftest.KillAfterCheckpoint", "+callbacks.kill.step=14"]


@pytest.fixture(scope="module")
def env() -> pytest.MonkeyPatch:
    """W&B offline and the hub off for this module's in-process runs (the autouse fixtures are per test)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("WANDB_MODE", "offline")
        yield patch


@pytest.fixture(scope="module")
def llama(hf_model_dir) -> list[str]:
    return [*HF, f"model.name_or_path={hf_model_dir('llama')}"]


@pytest.fixture(scope="module")
def gpt2(hf_model_dir) -> list[str]:
    return [*HF, f"model.name_or_path={hf_model_dir('gpt2')}"]


@pytest.fixture(scope="module")
def ddp_grid(tmp_path_factory, cache_dir, llama, env) -> Path:
    """``-m optim.lr=3e-3,1e-3 trainer=ddp_cpu``: a 2-point sweep, each point trained by 2 processes."""
    cwd = tmp_path_factory.mktemp("hf-ddp-grid")
    run_lmexp(
        cwd, cache_dir, "-m", *llama, "trainer=ddp_cpu", f"data.batch_size={BATCH}",
        f"optim.lr={','.join(LRS)}", "sweep.name=hf-grid", f"paths.output_dir={cwd / 'out'}",
    )  # fmt: skip
    return cwd / "out" / "multirun" / "hf-grid"


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache_dir, llama, env) -> dict[str, float]:
    """The first grid point in one process with the same global batch."""
    run_dir = tmp_path_factory.mktemp("hf-single") / "run"
    overrides = [*llama, f"data.batch_size={DEVICES * BATCH}", f"optim.lr={LRS[0]}"]
    return train(make_config(run_dir, cache_dir, "debug=fast", *SINGLE_RUN_OPTIONS, *overrides, tiny=False))


@pytest.fixture(scope="module")
def twins(tmp_path_factory, cache_dir, gpt2, env) -> tuple[Path, Path]:
    """(the run killed with -9 at step 14 and resumed with resume=auto, the same run never stopped)."""
    cwd = tmp_path_factory.mktemp("hf-kill9")
    reference, killed = cwd / "reference", cwd / "killed"
    run_lmexp(cwd, cache_dir, *gpt2, *KILLED_RUN, f"hydra.run.dir={reference}")
    command = [sys.executable, "-m", "lmexp.train", "debug=fast", *SINGLE_RUN_OPTIONS, *gpt2, *KILLED_RUN]
    process = subprocess.run(
        [*command, *KILL, f"hydra.run.dir={killed}"], cwd=cwd, capture_output=True, text=True, timeout=400,
        env=lmexp_environment(cwd, cache_dir) | {"PYTHONPATH": str(REPO)}, start_new_session=True,
    )  # fmt: skip
    assert process.returncode == -signal.SIGKILL, process.stderr[-3000:]
    assert _step(killed / "checkpoints" / "last.ckpt") == 14 and not (killed / "metrics.json").exists()
    resumed = run_lmexp(cwd, cache_dir, *gpt2, *KILLED_RUN, "resume=auto", f"hydra.run.dir={killed}")
    assert "resume=auto: continuing from" in resumed.stdout + resumed.stderr
    return killed, reference


# ------------------------------------------------------------------------------------------- DDP, sweep
@pytest.mark.slow  # 2 points x 2 processes over gloo
def test_ddp_sweep_points_train_like_one_process_and_the_summary_lists_both(ddp_grid, single):
    points = records(ddp_grid)
    assert [points[n]["status"] for n in (0, 1)] == ["finished", "finished"]
    for n in (0, 1):
        assert_rank_zero_outputs(ddp_grid / str(n))  # metrics.json, the CSV and W&B runs: rank 0's, once
        metrics = read_metrics(ddp_grid / str(n))
        assert points[n]["objective"] == pytest.approx(metrics["val/loss"])
        assert metrics["perf/global_batch_size"] == DEVICES * BATCH and metrics["perf/global_step"] == 10
    ddp = read_metrics(ddp_grid / "0")
    # rank r takes every 2nd sequence of the same order and the gradients are averaged: one process with
    # the global batch ends at the same weights, up to float rounding
    assert ddp["val/loss"] == pytest.approx(single["val/loss"], rel=1e-5)
    assert ddp["test/loss"] == pytest.approx(single["test/loss"], rel=1e-5)
    assert read_metrics(ddp_grid / "1")["val/loss"] != ddp["val/loss"]  # the other learning rate
    summary = json.loads((ddp_grid / "summary.json").read_text())
    assert [p["num"] for p in summary["points"]] == [0, 1]
    assert summary["best"] == min((0, 1), key=lambda n: points[n]["objective"])


# ----------------------------------------------------------------------------------- kill -9, resume
@pytest.mark.slow  # three runs of the real CLI, one killed with SIGKILL
def test_kill9_mid_epoch_then_resume_auto_matches_uninterrupted_run(twins):
    killed, reference = twins
    _assert_same_result(killed, reference)  # metrics, every weight (atol 1e-6), every train row once
    assert read_metrics(killed)["perf/global_step"] == 30
    with open(reference / "csv" / "metrics.csv", newline="") as handle:
        epochs = {float(row["epoch"]) for row in csv.DictReader(handle) if row.get("train/loss")}
    assert epochs == {0.0}  # every training step in the first epoch: killed and resumed mid-epoch
    # the same W&B run continues: one offline run dir per process, one run id
    runs = list((killed / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({run.name.rsplit("-", 1)[-1] for run in runs}) == 1


# ------------------------------------------------------------------------------------ precision, compile
@pytest.mark.slow
def test_bf16_mixed_with_gradient_checkpointing_trains_and_reports_perf(tmp_path, cache_dir, llama):
    run = tmp_path / "bf16"
    overrides = [*llama, "trainer.precision=bf16-mixed", "trainer.max_steps=4", "logger=csv"]
    overrides += ["model.gradient_checkpointing=true"]  # transformers' own, in a real run
    metrics = train(make_config(run, cache_dir, *overrides))
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert metrics["perf/tokens_per_sec"] > 0 and metrics["perf/flops_per_token"] > 0
    assert metrics["perf/tokens_per_step"] == 8 * 32  # debug=fast: 8 sequences of 32 tokens


@pytest.mark.slow  # torch.compile's first compilation of the model
def test_compiled_model_trains_like_the_eager_one(tmp_path, cache_dir, llama):
    # as few shapes as possible (each new one compiles again): 2 steps, one validation batch, no test
    short = [*llama, "logger=csv", "trainer.max_steps=2", "trainer.val_check_interval=2", "run_test=false"]
    short += ["trainer.limit_val_batches=1"]
    eager = train(make_config(tmp_path / "eager", cache_dir, *short))
    compiled = train(make_config(tmp_path / "compiled", cache_dir, *short, "compile=true"))
    assert compiled["val/loss"] == pytest.approx(eager["val/loss"], rel=1e-3)
    assert compiled["perf/flops_per_token"] == eager["perf/flops_per_token"] > 0
    assert compiled["perf/tokens_per_sec"] > 0


# -------------------------------------------------------------------------------- eval, generate, W&B
@pytest.mark.slow
def test_eval_scores_the_checkpoint_as_the_run_did(twins, tmp_path, cache_dir):
    from lmexp.inference.evaluate import evaluate
    from tests.tasks.helpers import compose_tool

    _, reference = twins
    scored = evaluate(compose_tool("eval", tmp_path, cache_dir, f"ckpt_path={reference}"))
    trained = read_metrics(reference)  # the same final weights and test split
    assert scored["test/tokens"] == trained["test/tokens"]
    # eval scores each document on its own, the run packed them into blocks: close, not equal
    assert scored["test/loss"] == pytest.approx(trained["test/loss"], rel=1e-2)
    assert scored["test/bpb"] == pytest.approx(trained["test/bpb"], rel=1e-2)


@pytest.mark.slow
def test_generate_goes_through_the_models_kv_cache(twins, cache_dir, capsys):
    from lmexp.inference.generate import generate, generate_ids
    from lmexp.inference.restore import restore_run
    from tests.tasks.helpers import compose_tool

    _, reference = twins
    model = restore_run(reference, cache_dir).task.model  # HFModel, eval mode
    prompt = [0, 40, 41, 42]
    lengths: list[int] = []  # the tokens each forward of the transformers model is given
    model.hf.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    cached = generate_ids(model, prompt, 12, model.config.vocab_size, None, num_samples=2)
    assert lengths == [len(prompt)] + [1] * 11  # the prompt once, then one new token a step
    recomputed = generate_ids(model, prompt, 12, model.config.vocab_size, None, use_cache=False)
    with torch.no_grad():
        theirs = model.hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    theirs = theirs[0, len(prompt) :].tolist()  # transformers' own greedy search (it may stop at eos)
    assert cached == recomputed * 2 and cached[0][: len(theirs)] == theirs
    # the command on the same checkpoint
    texts = generate(compose_tool("generate", reference, cache_dir, f"ckpt_path={reference}", "prompt=the"))
    assert len(texts) == 1 and texts[0].startswith("the") and texts[0] in capsys.readouterr().out


@pytest.mark.slow  # the real CLI
def test_generate_past_the_models_positions_is_one_line_before_sampling(twins, cli):
    _, reference = twins
    offline = {"HF_HUB_OFFLINE": "1"}
    result = cli("lmexp.generate", f"ckpt_path={reference}", "max_new_tokens=200", env=offline)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-3000:]
    assert f"exceeds the model's max_position_embeddings={POSITIONS}" in lines[0] and not result.stdout


@pytest.mark.slow
def test_wandb_offline_run_holds_the_runs_metrics_and_config(twins, hf_model_dir):
    _, reference = twins
    (offline,) = (reference / "wandb").glob("offline-run-*")
    found = wandb_records(offline)
    history = [r["history"]["item"] for r in found if r.get("type") == "history"]
    assert any("train/loss" in row for row in history) and any("val/loss" in row for row in history)
    config = json.dumps([r for r in found if r.get("type") in ("config", "run")])
    assert str(hf_model_dir("gpt2")) in config and "lmexp.models.hf.HFModelConfig" in config
