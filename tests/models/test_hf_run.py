"""model=hf, init_from=hf: and model.lora end to end: real Lightning runs of tiny saved transformers models"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmexp.inference.restore import restore_run
from tests.models.hf_helpers import corpus, save_tiny_model, wordpiece_tokenizer
from tests.tasks.helpers import compose_tool, labelled_splits

# A run of a few seconds; every test adds the model, data and task.
HF_TINY = [
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "trainer.limit_val_batches=2",
    "scheduler.warmup_steps=1",
    "data.block_size=32",
    "data.batch_size=8",
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # every model comes from a local directory


@pytest.fixture(scope="module")
def user_text(tmp_path_factory) -> Path:
    """A user's own text file (documents separated by blank lines)."""
    path = tmp_path_factory.mktemp("user") / "my-notes.txt"
    path.write_text("\n\n".join(corpus()[:200]) + "\n", encoding="utf-8")
    return path


def train_run(run_dir: Path, cache_dir: Path, *overrides: str) -> dict:
    from lmexp.train import train
    from tests.conftest import make_config

    builtin = [] if any(o.startswith("data=") for o in overrides) else ["data.n_documents=300"]
    train(make_config(run_dir, cache_dir, *HF_TINY, *builtin, *overrides, tiny=False))
    return json.loads((run_dir / "metrics.json").read_text())


def logits_of(run_dir: Path, cache_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    task = restore_run(run_dir, cache_dir).task
    with torch.no_grad():
        return task.model(ids)


@pytest.mark.slow
def test_seed_flow_fine_tune_generate_export(cli, hf_model_dir, user_text, tmp_path, cache_dir):
    """README's "Your own model": fine-tune a saved GPT-2 on your text, sample from it, export it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    trained = cli(
        "lmexp.train", "model=hf", f"model.name_or_path={hf_model_dir('gpt2')}", "data=text",
        f"data.path={user_text}", *HF_TINY, "logger=[csv,wandb]", f"hydra.run.dir={run}",
        env={"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1  # W&B, offline in tests
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val/loss", "val/bpw", "test/bpw"} <= set(metrics)
    assert metrics["model/trainable_params"] == metrics["model/params"] > 0
    sampled = cli("lmexp.generate", f"ckpt_path={run}", "prompt=the", "max_new_tokens=8", "num_samples=2")
    assert sampled.returncode == 0 and len(sampled.stdout.strip()) > len("the"), sampled.stderr[-2000:]
    out = tmp_path / "exported"
    exported = cli("lmexp.export", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"out={out}")
    assert exported.returncode == 0, exported.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = AutoTokenizer.from_pretrained(out)(corpus()[0][:200], return_tensors="pt")["input_ids"][:, :32]
    with torch.no_grad():
        theirs = model(input_ids=ids).logits
    assert (logits_of(run, cache_dir, ids) - theirs).abs().max() <= 1e-4


@pytest.mark.slow
def test_lora_trains_and_checkpoints_only_adapters_resumes_and_merges(hf_model_dir, tmp_path, cache_dir):
    from transformers import AutoModelForCausalLM

    from lmexp.inference.export import export

    run = tmp_path / "lora"
    lora = ["model.lora.r=4", "model.lora.alpha=8", "model.lora.target=[q_proj,v_proj]"]
    base = ["model=hf", f"model.name_or_path={hf_model_dir('llama')}", *lora]
    metrics = train_run(run, cache_dir, *base)
    assert 0 < metrics["model/trainable_params"] < metrics["model/params"] / 4
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    names = set(checkpoint["state_dict"])
    assert names and all("lora_A" in name or "lora_B" in name for name in names)
    assert checkpoint["lmexp"]["lora_base"]["hf"] == str(hf_model_dir("llama"))
    # resume applies LoRA before loading the adapters
    train_run(run, cache_dir, *base, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=6")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    from lmexp.inference.evaluate import evaluate

    scored = evaluate(compose_tool("eval", tmp_path / "eval", cache_dir, f"ckpt_path={run}"))
    assert scored["test/loss"] > 0  # lmexp.eval restores base + adapters
    out = tmp_path / "merged"
    export(compose_tool("export", tmp_path, cache_dir, f"ckpt_path={run}", f"out={out}"))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name in merged.state_dict())
    ids = torch.tensor([list(range(3, 19))])
    with torch.no_grad():
        diff = (logits_of(run, cache_dir, ids) - merged(input_ids=ids).logits).abs().max()
    assert diff <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "task"), [("bert", "mlm"), ("qwen2", "classify"), ("bert", "ner")], ids=lambda v: v
)
def test_pretrain_and_fine_tune_tasks(family, task, hf_model_dir, tmp_path, cache_dir):
    overrides = ["model=hf", f"model.name_or_path={hf_model_dir(family)}", f"task={task}"]
    if task == "mlm":
        overrides += ["task.nsp=false"]
    else:
        overrides += ["data=jsonl", *labelled_splits(tmp_path / "data", task, (120, 30, 30))]
    metrics = train_run(tmp_path / "run", cache_dir, *overrides)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert metrics["model/trainable_params"] == metrics["model/params"] and "val/loss" in metrics
    if task != "mlm":  # lmexp.eval of a model=hf fine-tuned run
        from lmexp.inference.evaluate import evaluate

        scored = evaluate(compose_tool("eval", tmp_path / "eval", cache_dir, f"ckpt_path={tmp_path / 'run'}"))
        assert all(torch.isfinite(torch.tensor(v)) for v in scored.values())


@pytest.mark.slow
def test_init_from_hf_continues_pre_training_in_lmexps_own_model(hf_model_dir, tmp_path, cache_dir):
    """init_from=hf: puts a transformers GPT-2 into lmexp's gpt; the run starts from its logits."""
    from transformers import AutoModelForCausalLM

    source = hf_model_dir("gpt2")
    run = tmp_path / "imported"
    train_run(run, cache_dir, f"init_from=hf:{source}", "trainer.max_steps=1", "optim.lr=1e-12")
    hf = AutoModelForCausalLM.from_pretrained(source).eval()
    ids = torch.tensor([list(range(5, 25))])
    with torch.no_grad():
        diff = (logits_of(run, cache_dir, ids)[..., : hf.config.vocab_size] - hf(input_ids=ids).logits).abs()
    assert diff.max() <= 1e-3  # one step at lr 1e-12: the imported weights


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def bad_dirs(tmp_path_factory, hf_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-models")
    (root / "no-config").mkdir()
    (root / "remote").mkdir()
    config = {"model_type": "my-llm", "auto_map": {"AutoModelForCausalLM": "modeling_my.MyLM"}}
    (root / "remote" / "config.json").write_text(json.dumps(config))
    no_mask = save_tiny_model(root / "bert-no-mask", "bert", tokenizer=wordpiece_tokenizer(mask=False))
    no_pad = save_tiny_model(root / "bert-no-pad", "bert", tokenizer=wordpiece_tokenizer(pad=False))
    data = labelled_splits(root / "data", "classify", (20, 5, 5))
    return {
        "bert_no_pad": no_pad,
        "train": data[0].split("=", 1)[1],
        "val": data[1].split("=", 1)[1],
        "no_config": root / "no-config",
        "remote": root / "remote",
        "bert_no_mask": no_mask,
        "bert": hf_model_dir("bert"),
        "llama": hf_model_dir("llama"),
        "gpt2": hf_model_dir("gpt2"),
    }


BAD = {
    "no config.json": (["model=hf", "model.name_or_path={no_config}"], "has no config.json"),
    "no causal-LM head": (["model=hf", "model.name_or_path={bert}", "task=clm"], "task=clm needs a causal"),
    "no mask token": (
        ["model=hf", "model.name_or_path={bert_no_mask}", "task=mlm", "task.nsp=false"],
        "has no mask token, which task=mlm needs",
    ),
    "no pad token": (
        ["model=hf", "model.name_or_path={bert_no_pad}", "task=classify", "data=jsonl"]
        + ["data.train_path={train}", "data.val_path={val}"],
        "has no pad token, which task=classify needs",
    ),
    "remote code": (["model=hf", "model.name_or_path={remote}"], "model.trust_remote_code=true"),
    "lora target": (
        ["model=hf", "model.name_or_path={llama}", "model.lora.r=4", "model.lora.target=[qkv]"],
        "q_proj",  # the Linear layers that exist are named
    ),
    "import shapes": (
        ["model=hf", "model.name_or_path={gpt2}", "model.config_overrides={{n_embd:64}}"],
        "do not have the shapes",
    ),
    "missing hub model": (["init_from=hf:nobody-here/no-such-model-xyz"], "could not find or fetch"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD))
def test_bad_model_input_is_one_line(case, bad_dirs, cli, tmp_path):
    overrides, culprit = BAD[case]
    args = [o.format(**bad_dirs) for o in overrides]
    tiny = [*HF_TINY, *([] if "data=jsonl" in args else ["data.n_documents=300"])]
    result = cli("lmexp.train", *tiny, *args, env={"HF_HUB_OFFLINE": "1"}, timeout=180)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], result.stderr[-3000:]
    assert not list(tmp_path.rglob("metrics.json")) and not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow  # two processes over gloo: ~10 s of start-up
def test_fsdp_shards_each_decoder_layer_and_restores(hf_model_dir, tmp_path, cache_dir):
    from tests.training.test_distributed import FSDP_CPU, run_lmexp

    run = tmp_path / "fsdp"
    run_lmexp(
        tmp_path, cache_dir, "model=hf", f"model.name_or_path={hf_model_dir('qwen2')}", "~model.n_layer",
        "~model.n_embd", *FSDP_CPU, "trainer.max_steps=2", "trainer.val_check_interval=2", "run_test=false",
        f"hydra.run.dir={run}",
    )  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    ids = torch.tensor([list(range(3, 13))])
    assert torch.isfinite(logits_of(run, cache_dir, ids)).all()  # the sharded checkpoint restores
