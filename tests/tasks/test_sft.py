"""task=sft: completion-only loss, packed examples kept apart, training + lmexp.eval, bad rows."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import default_collate

from lmexp.data.sft import RenderedExample, pack_examples
from lmexp.models.gpt import GPTConfig
from lmexp.models.llama import LlamaConfig
from lmexp.tasks.base import TaskInputs
from lmexp.tasks.generation_metrics import generation_metrics
from lmexp.tasks.metrics import IGNORE_INDEX
from lmexp.tasks.sft import SFTConfig, SFTTask
from tests.tasks.helpers import pretrained_checkpoint, write_jsonl

EOS, PAD, VOCAB = 1, 0, 40
MODELS = {
    "gpt": lambda: GPTConfig(n_layer=1, n_head=2, n_embd=32, max_seq_len=32, vocab_size=VOCAB).build(),
    "llama": lambda: LlamaConfig(
        n_layer=1, n_head=2, n_embd=32, max_seq_len=32, vocab_size=VOCAB, mlp_multiple_of=16
    ).build(),
}


def example(prompt: list[int], completion: list[int]) -> RenderedExample:
    """``[eos] prompt completion [eos]``, learned on the completion and its eos, as render_examples does."""
    learned = [*completion, EOS]
    return RenderedExample([EOS, *prompt, *learned], [IGNORE_INDEX] * (1 + len(prompt)) + learned)


def batch_of(*examples: RenderedExample, block_size: int = 32) -> dict[str, torch.Tensor]:
    blocks = pack_examples(list(examples), block_size, PAD)
    return default_collate([blocks[i] for i in range(len(blocks))])


def task_of(kind: str) -> SFTTask:
    torch.manual_seed(0)
    inputs = TaskInputs(SimpleNamespace(vocab_size=VOCAB))
    return SFTTask.build(SFTConfig(), MODELS[kind](), inputs).eval()


def loss_of(task: SFTTask, batch: dict[str, torch.Tensor], noisy: torch.Tensor | None = None) -> float:
    """Mean NLL over the completion targets; ``noisy`` (B, T): positions whose final states get noise."""
    final_norm = getattr(task.model, "ln_f", None) or task.model.norm
    hook = None
    if noisy is not None:
        hook = final_norm.register_forward_hook(
            lambda m, i, out: out + 50 * noisy[..., None] * torch.randn_like(out)
        )
    try:
        with torch.no_grad():
            nll_sum, _, n = task._nll(batch)
    finally:
        if hook is not None:
            hook.remove()
    return float(nll_sum / n)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_loss_covers_completion_tokens_only(kind):
    task = task_of(kind)
    batch = batch_of(example([5, 6, 7, 8], [9, 10, 11]))
    labels = batch["labels"]  # next-token targets: -100 wherever the next token is a prompt token
    assert (labels[0, :4] == IGNORE_INDEX).all() and labels[0, 4:8].tolist() == [9, 10, 11, EOS]
    base = loss_of(task, batch)
    # Whatever the model predicts for a prompt token (its label) changes nothing ...
    assert loss_of(task, batch, noisy=(labels == IGNORE_INDEX).float()) == pytest.approx(base, abs=1e-6)
    # ... while a completion token's prediction does.
    assert abs(loss_of(task, batch, noisy=(labels != IGNORE_INDEX).float()) - base) > 1e-3
    # A different prompt token changes the loss only by conditioning, never as a target.
    other = batch_of(example([5, 6, 7, 12], [9, 10, 11]))
    assert (other["labels"] == labels).all()


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_packed_examples_never_see_each_other(kind):
    task = task_of(kind)
    first, second = example([5, 6], [7, 8]), example([9, 10, 11], [12])
    together = batch_of(first, second)
    assert together["input_ids"].shape[0] == 1 and set(together["document_ids"][0].tolist()) >= {0, 1}
    alone = [batch_of(first), batch_of(second)]
    n_together = int((together["labels"] != IGNORE_INDEX).sum())
    summed = sum(loss_of(task, b) * int((b["labels"] != IGNORE_INDEX).sum()) for b in alone)
    assert loss_of(task, together) * n_together == pytest.approx(summed, abs=1e-4)


SFT_TINY = [
    "task=sft",
    "model=gpt",
    "data=sft",
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.max_steps=6",
    "trainer.val_check_interval=6",
    "scheduler.warmup_steps=2",
    "data.block_size=32",
    "data.batch_size=8",
]
WORDS = ["cat", "dog", "car", "bus", "bread", "soup"]


def copy_rows(n: int, seed: int) -> list[dict]:
    """``copy: <words>`` -> the words, half as prompt/completion and half as chats."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = " ".join(rng.choices(WORDS, k=2))
        if i % 2:
            rows.append({"prompt": f"copy: {words} =", "completion": words})
        else:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": f"copy: {words}"},
                        {"role": "assistant", "content": words},
                    ]
                }
            )
    return rows


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, cache_dir):
    from lmexp.train import train
    from tests.conftest import make_config

    root = tmp_path_factory.getbasetemp()
    gpt = pretrained_checkpoint("gpt", root / "pretrained", cache_dir)
    data = root / "sft-data"
    data.mkdir(exist_ok=True)
    paths = [
        f"data.{split}_path={write_jsonl(data / f'{split}.jsonl', copy_rows(n, seed))}"
        for split, n, seed in (("train", 80, 1), ("val", 12, 2), ("test", 10, 3))
    ]
    run_dir = root / "sft-run"
    train(make_config(run_dir, cache_dir, *SFT_TINY, f"init_from={gpt}", *paths, tiny=False))
    return run_dir


@pytest.mark.slow
def test_sft_trains_and_eval_scores_generated_completions(sft_run, cli, tmp_path):
    trained = json.loads((sft_run / "metrics.json").read_text())
    assert {"val/loss", "val/acc", "test/loss"} <= set(trained)

    result = cli("lmexp.eval", f"ckpt_path={sft_run}", "generation.max_new_tokens=6")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = next((tmp_path / "outputs" / "eval").glob("*/*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    assert [r["reference"] for r in rows] == [
        r.get("completion") or r["messages"][-1]["content"] for r in copy_rows(10, 3)
    ]
    corpus, per_row = generation_metrics([r["pred"] for r in rows], [r["reference"] for r in rows])
    for name in ("exact_match", "rougeL", "chrf", "bleu"):
        assert metrics[f"test/{name}"] == pytest.approx(corpus[name], abs=1e-9)
        assert [r[name] for r in rows] == pytest.approx([p[name] for p in per_row])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "copy: cat ="}, "line 2: has no field 'completion'"),
        (
            {"messages": [{"role": "robot", "content": "hi"}]},
            "line 2: messages[0] has role 'robot'; known roles",
        ),
    ],
    ids=["no_completion", "unknown_role"],
)
def test_bad_sft_rows_are_one_line_from_the_cli(cli, tmp_path, row, message):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "completion": "b"}, row])
    args = ["task=sft", "data=sft", f"data.train_path={path}", f"data.val_path={path}"]
    result = cli("lmexp.train", *args, forked=True)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: data.train_path: {path} line 2") and message in last, last
    assert "Traceback" not in result.stderr
