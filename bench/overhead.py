"""Framework overhead: the full ``lmexp.train`` path against a bare PyTorch loop over the same model and data.

Measured for lmexp's own GPT (``overhead/full_path``) and for ``model=hf`` over a transformers GPT-2 of the
same size, saved to a temporary directory (``overhead/hf_full_path``; the bare loop calls the same wrapped
transformers model).

The full path is everything a user gets from ``python -m lmexp.train``: Hydra's config, Lightning's loop,
torchmetrics updated every step, the CSV and W&B (offline) loggers, the rich progress bar, the
throughput, learning-rate and checkpoint callbacks. The bare loop builds the same model, optimizer,
schedule and DataLoader through lmexp's builders and then does only the arithmetic: fetch a batch,
forward, loss, backward, clip, step. Both are timed per step in steady state (after a warm-up); a full
run's steps include the logging every ``trainer.log_every_n_steps``, so its mean step time carries that
cost. Runs alternate: full, bare, full, bare.

The same runs give the DataLoader wait: the share of the bare loop's step spent waiting for the next
batch, and (an upper bound) the share of the full path's step spent between one step's end and the
next one's start.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from bench.common import Result, median
from lmexp.config.compose import compose_job

DEFAULT_OVERRIDES = ["model=gpt"]  # the README's main job, shortened below
SMOKE_OVERRIDES = ["debug=fast"]


class StepClock(Callback):
    """Records when each training batch starts and ends."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.ends.append(time.perf_counter())


def _job_overrides(base: list[str], steps: int) -> list[str]:
    # Validation only once, after the timed steps, so no step in the window includes it.
    return [*base, f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "run_test=false"]


def full_path_steps(base: list[str], steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """Per-step seconds of a full ``lmexp.train`` run, and the gaps from a step's end to the next start."""
    from lmexp.train import train

    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="lmexp-bench-") as run_dir:
        train(compose_job(_job_overrides(base, steps), Path(run_dir)), extra_callbacks=[clock])
    step_times = [b - a for a, b in zip(clock.starts, clock.starts[1:], strict=False)][warmup:]
    gaps = [start - end for end, start in zip(clock.ends, clock.starts[1:], strict=False)][warmup:]
    return step_times, gaps


def bare_loop_steps(base: list[str], steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """Per-step seconds of a plain loop over lmexp's model and data, and the time in ``next(loader)``."""
    import lightning.pytorch as pl

    from lmexp.tasks.metrics import IGNORE_INDEX
    from lmexp.training.build import build_run

    with tempfile.TemporaryDirectory(prefix="lmexp-bench-") as run_dir:
        cfg = compose_job(_job_overrides(base, steps), Path(run_dir))
        pl.seed_everything(cfg.seed, verbose=False)
        _, datamodule, task = build_run(cfg)
        datamodule.setup("fit")
    model = task.model.train()
    configured = task.configure_optimizers()
    optimizer = configured["optimizer"]
    scheduler = configured.get("lr_scheduler", {}).get("scheduler")
    clip = cfg.trainer.gradient_clip_val
    batches = iter(datamodule.train_dataloader())
    step_times, waits = [], []
    for _ in range(steps):
        start = time.perf_counter()
        batch = next(batches)
        fetched = time.perf_counter()
        labels = batch["labels"]  # (B, T)
        nll_sum, _ = model(batch["input_ids"], labels=labels)  # the model's loss path, as the task's
        loss = nll_sum / (labels != IGNORE_INDEX).sum().clamp(min=1)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - start)
        waits.append(fetched - start)
    return step_times[warmup:], waits[warmup:]


def saved_hf_model(directory: Path, smoke: bool) -> Path:
    """A transformers GPT-2 of model=gpt's nano size (debug=fast's in smoke mode) with a byte-level BPE
    tokenizer trained on the built-in corpus, saved to ``directory``: what model=hf loads (no download)."""
    from transformers import GPT2LMHeadModel

    from tests.models.hf_helpers import byte_level_tokenizer, tiny_config

    tokenizer = byte_level_tokenizer()
    sizes = {"n_layer": 1, "n_head": 2, "n_embd": 32} if smoke else {"n_layer": 4, "n_head": 4, "n_embd": 128}
    config = tiny_config("gpt2", tokenizer, n_positions=256, **sizes)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def run(smoke: bool = False, overrides: list[str] | None = None) -> list[Result]:
    """lmexp's own model (model=gpt), then model=hf over a transformers GPT-2 of the same size."""
    base = [*(SMOKE_OVERRIDES if smoke else DEFAULT_OVERRIDES), *(overrides or [])]
    results = compare(base, smoke, "overhead/full_path", with_loader_wait=True)
    with tempfile.TemporaryDirectory(prefix="lmexp-bench-hf-") as directory:
        model = saved_hf_model(Path(directory), smoke)
        hf_base = [*base, "model=hf", f"model.name_or_path={model}"]
        if smoke:  # debug=fast sizes lmexp's own models
            hf_base += ["~model.n_layer", "~model.n_embd"]
        results += compare(hf_base, smoke, "overhead/hf_full_path", with_loader_wait=False)
    return results


def compare(base: list[str], smoke: bool, name: str, with_loader_wait: bool) -> list[Result]:
    """The full path against the bare loop for the job ``base``: its ratio (and the DataLoader wait)."""
    steps, warmup, rounds = (6, 2, 1) if smoke else (60, 10, 2)
    full_means, bare_means, full_gaps, waits = [], [], [], []
    for _ in range(rounds):
        step_times, gaps = full_path_steps(base, steps, warmup)
        full_means.append(statistics.mean(step_times))
        full_gaps.append(statistics.mean(gaps) / statistics.mean(step_times))
        step_times, wait = bare_loop_steps(base, steps, warmup)
        bare_means.append(statistics.mean(step_times))
        waits.append(statistics.mean(wait) / statistics.mean(step_times))
    full, bare = median(full_means), median(bare_means)
    round_ratios = [f / b for f, b in zip(full_means, bare_means, strict=True)]
    ratio = full / bare
    wait_share = median(waits)
    notes = [f"lmexp.train {' '.join(base)}", f"{rounds} rounds of {steps} steps, first {warmup} dropped"]
    results = [
        Result(
            name=name,
            values={
                "full_path_step_sec": full,
                "bare_loop_step_sec": bare,
                "lowest_round_ratio": min(round_ratios),
                "highest_round_ratio": max(round_ratios),
            },
            ratio=ratio,
            ratio_meaning="full lmexp.train step time / bare PyTorch loop step time",
            goal="<= 1.05",
            met=ratio <= 1.05,
            notes=notes,
        ),
        Result(
            name="data/loader_wait",
            values={"bare_loop_wait_share": wait_share, "full_path_between_steps_share": median(full_gaps)},
            ratio=wait_share,
            ratio_meaning="share of the step spent waiting for the DataLoader (bare loop)",
            goal="< 0.02",
            met=wait_share < 0.02,
            notes=[*notes, "full_path_between_steps_share also holds Lightning's hooks and logging"],
        ),
    ]
    return results if with_loader_wait else results[:1]
