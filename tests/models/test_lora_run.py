"""LoRA on lmexp's own kinds end to end: pre-train a tiny gpt / llama run, fine-tune it with
``init_from=<run> model.lora.r=4`` on a user's text, resume, evaluate, and export the merged model.

Each kind's runs are made once (module-scoped) and read by every test; every run is a real Lightning run
in this process.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from lmexp.inference.restore import restore_run
from lmexp.train import train
from tests.conftest import make_config
from tests.models.hf_helpers import corpus
from tests.tasks.helpers import compose_tool

QUIET = ["logger=csv", "callbacks.progress_bar=null", "callbacks.model_summary=null"]
TARGETS = {"gpt": "[qkv]", "llama": "[q_proj,v_proj]"}  # module-name suffixes of each kind's Linear layers
LORA_STEPS, RESUMED_STEPS = 6, 8


@contextmanager
def logged(name: str) -> Iterator[list[str]]:
    """The messages logger ``name`` logs at INFO and above inside the block (caplog is per test only)."""
    logger, records = logging.getLogger(name), []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def user_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("user") / "notes.txt"
    path.write_text("\n\n".join(corpus()[:150]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=list(TARGETS))
def lora_runs(request, tmp_path_factory, cache_dir, user_text) -> dict:
    """A kind's pre-trained run, its LoRA fine-tune on the user's text (metrics and the log), and the
    fine-tune resumed to a later step."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"lora-{kind}")
    base = root / "base"
    train(make_config(base, cache_dir, f"model={kind}", *QUIET))  # debug=fast: 10 steps, 1 layer, 32 wide
    lora = [f"init_from={base}", "model.lora.r=4", "model.lora.alpha=8", f"model.lora.target={TARGETS[kind]}"]
    data = ["data=text", f"data.path={user_text}", "data.block_size=32", "data.batch_size=8"]
    steps = ["trainer.val_check_interval=3", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=2"]
    fine_tune = [*QUIET, *lora, *data, *steps, "scheduler.warmup_steps=1"]
    run = root / "lora"
    first_steps = f"trainer.max_steps={LORA_STEPS}"
    with logged("lmexp.training.build") as records:
        metrics = train(make_config(run, cache_dir, *fine_tune, first_steps, tiny=False))
    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    last = run / "checkpoints" / "last.ckpt"
    resumed = root / "resumed"
    resume = [f"ckpt_path={last}", f"trainer.max_steps={RESUMED_STEPS}"]
    resumed_metrics = train(make_config(resumed, cache_dir, *fine_tune, *resume, tiny=False))
    return {
        "kind": kind, "base": base, "run": run, "metrics": metrics, "log": records, "checkpoint": first,
        "resumed": resumed, "resumed_metrics": resumed_metrics,
    }  # fmt: skip


@pytest.mark.slow
def test_only_adapters_train_and_are_checkpointed_with_their_base(lora_runs):
    metrics, checkpoint = lora_runs["metrics"], lora_runs["checkpoint"]
    trainable = int(metrics["model/trainable_params"])  # metrics.json holds floats
    assert 0 < trainable < metrics["model/params"] / 4
    names = set(checkpoint["state_dict"])
    assert names and all(".lora_A." in name or ".lora_B." in name for name in names)
    adapters = sum(tensor.numel() for tensor in checkpoint["state_dict"].values())
    assert adapters == trainable  # the checkpoint holds exactly what trains
    assert checkpoint["lmexp"]["lora_base"]["init_from"] == str(lora_runs["base"])
    assert checkpoint["lmexp"]["lora_base"]["fingerprint"]
    printed = [line for line in lora_runs["log"] if "trainable" in line]
    assert printed and f"{trainable:,} trainable" in printed[0] and "LoRA r=4" in printed[0]
    assert json.loads((lora_runs["run"] / "metrics.json").read_text())["model/trainable_params"] == trainable


@pytest.mark.slow
def test_base_weights_stay_and_adapters_move(lora_runs, cache_dir):
    base = restore_run(lora_runs["base"], cache_dir).task.model.state_dict()
    adapted = restore_run(lora_runs["run"], cache_dir).task.model.state_dict()
    frozen = {name.replace(".base_layer", ""): v for name, v in adapted.items() if "lora_" not in name}
    assert frozen.keys() == base.keys()
    for name, value in frozen.items():
        torch.testing.assert_close(value, base[name], rtol=0, atol=0, msg=name)
    assert any(value.abs().sum() > 0 for name, value in adapted.items() if "lora_B" in name)  # B starts at 0


@pytest.mark.slow
def test_resume_continues_the_adapters(lora_runs):
    resumed = torch.load(lora_runs["resumed"] / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == RESUMED_STEPS
    assert resumed["state_dict"].keys() == lora_runs["checkpoint"]["state_dict"].keys()
    assert torch.isfinite(torch.tensor(lora_runs["resumed_metrics"]["val/loss"]))


@pytest.mark.slow
def test_eval_and_export_merge_the_adapters_with_equal_logits(lora_runs, tmp_path, cache_dir):
    from transformers import AutoModelForCausalLM

    from lmexp.inference.evaluate import evaluate
    from lmexp.inference.export import export

    run = lora_runs["run"]
    scored = evaluate(compose_tool("eval", tmp_path / "eval", cache_dir, f"ckpt_path={run}"))
    # the restored base + adapters; eval scores each document on its own, the run packed them: close
    assert scored["test/tokens"] == lora_runs["metrics"]["test/tokens"]
    assert scored["test/loss"] == pytest.approx(lora_runs["metrics"]["test/loss"], rel=1e-2)
    out = tmp_path / "merged"
    export(compose_tool("export", tmp_path, cache_dir, f"ckpt_path={run}", f"out={out}"))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name in merged.state_dict())
    ids = torch.tensor([list(range(3, 27))])
    adapted = restore_run(run, cache_dir).task.model
    with torch.no_grad():
        ours, theirs = adapted(ids), merged(input_ids=ids).logits  # (1, T, V') and (1, T, V)
    assert (ours[..., : theirs.shape[-1]] - theirs).abs().max() <= 1e-4
