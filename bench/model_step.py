"""Model step: one training step (forward, loss, backward, AdamW) of lmexp's models against Hugging Face's.

Both sides get the same dimensions, batch, sequence length, thread count and input tensors; each side
runs as its own framework trains it:

- lmexp: the model from ``conf/model/*.yaml``, the loss as the task computes it, the optimizer the task
  configures from ``conf/optim/adamw.yaml`` (decay groups; the fused step where torch has one).
- Hugging Face: ``GPT2LMHeadModel`` / ``BertForMaskedLM`` / ``LlamaForCausalLM`` with
  ``attn_implementation="sdpa"``, the loss the model computes from ``labels``, and
  ``torch.optim.AdamW(fused=True)``, which is what the HF Trainer uses by default with torch >= 2.8
  (``optim="adamw_torch_fused"``).

GPT runs at two vocabularies (4000, and GPT-2's 50257, where the output layer dominates). The whole
comparison runs twice: in this process, with glibc's malloc as it comes, and in a child process whose
malloc keeps freed memory (``TUNED_MALLOC_ENV``): how much of a ratio is page faults shows as the
difference (bench/RESULTS.md, 2026-11-23 afternoon).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench.common import Result, interleaved, median, spread


@dataclass
class StepShape:
    """Sizes shared by both sides of a comparison."""

    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    seq_len: int
    batch_size: int

    def describe(self) -> str:
        return (
            f"{self.n_layer} layers x {self.n_embd} wide, {self.n_head} heads, vocab {self.vocab_size}, "
            f"seq {self.seq_len}, batch {self.batch_size}, fp32"
        )


# The peer figure in the project's notes was taken at this GPT size; BERT uses the same width and depth.
GPT_SHAPE = StepShape(n_layer=4, n_head=4, n_embd=256, vocab_size=4000, seq_len=256, batch_size=8)
# GPT-2's own vocabulary, where the output layer and the loss are most of the step.
GPT2_VOCAB_SHAPE = dataclasses.replace(GPT_SHAPE, vocab_size=50257)
BERT_SHAPE = StepShape(n_layer=4, n_head=4, n_embd=256, vocab_size=4000, seq_len=128, batch_size=16)
ADAMW_SHAPE = StepShape(n_layer=6, n_head=8, n_embd=512, vocab_size=4000, seq_len=256, batch_size=1)
SMOKE_SHAPE = StepShape(n_layer=1, n_head=2, n_embd=32, vocab_size=300, seq_len=16, batch_size=2)


def lmexp_config(model: str, overrides: list[str]):
    """The composed lmexp config for ``model`` (so conf/optim and conf/model defaults apply)."""
    from hydra import compose, initialize_config_dir

    from lmexp.config.compose import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=[f"model={model}", *overrides])


def _lmexp_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer a task configures from ``conf/optim`` (decay groups, fused step where it applies)."""
    from lmexp.config.settings import group

    return group(cfg, "optim").build(model)


def _lmexp_side(model: str, shape: StepShape, overrides: list[str]) -> tuple[Any, torch.nn.Module, Any]:
    """lmexp's model config, model (in training mode) and optimizer for ``shape``."""
    from lmexp.config.settings import group

    torch.manual_seed(0)
    cfg = lmexp_config(model, [*_shape_overrides(shape), *overrides])
    config = group(cfg, "model", vocab_size=shape.vocab_size)
    built = config.build().train()
    return config, built, _lmexp_optimizer(cfg, built)


def _train_step(loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    def step() -> None:
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def gpt_steps(shape: StepShape, overrides: list[str]) -> dict[str, Callable[[], None]]:
    """One training step of lmexp's GPT and of HF's GPT2LMHeadModel, as closures."""
    from transformers import GPT2LMHeadModel

    from lmexp.models import gpt_hf

    config, ours, ours_optimizer = _lmexp_side("gpt", shape, overrides)

    # lmexp's HF adapter maps the architecture; no tokenizer here, so bos/eos/pad are plain ids.
    ids = {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}
    theirs = GPT2LMHeadModel(_sdpa(gpt_hf.hf_config(config, shape.vocab_size, ids)))
    theirs, theirs_optimizer = _hf_side(theirs)

    tokens = torch.randint(0, shape.vocab_size, (shape.batch_size, shape.seq_len + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def our_loss() -> torch.Tensor:
        # As CausalLMTask computes it: the model's loss path, which never materialises the logits.
        return ours(inputs, labels=labels).nll_sum / labels.numel()

    def their_loss() -> torch.Tensor:
        return theirs(input_ids=inputs, labels=inputs).loss  # shifts internally: T - 1 predictions

    return {"lmexp": _train_step(our_loss, ours_optimizer), "hf": _train_step(their_loss, theirs_optimizer)}


def llama_steps(shape: StepShape, overrides: list[str]) -> dict[str, Callable[[], None]]:
    """One training step of lmexp's Llama and of HF's LlamaForCausalLM at the same dimensions."""
    from transformers import LlamaForCausalLM

    from lmexp.models import llama_hf

    config, ours, ours_optimizer = _lmexp_side("llama", shape, overrides)
    ids = {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}
    theirs = LlamaForCausalLM(_sdpa(llama_hf.hf_config(config, shape.vocab_size, ids)))
    theirs, theirs_optimizer = _hf_side(theirs)

    tokens = torch.randint(0, shape.vocab_size, (shape.batch_size, shape.seq_len + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def our_loss() -> torch.Tensor:
        return ours(inputs, labels=labels).nll_sum / labels.numel()

    def their_loss() -> torch.Tensor:
        return theirs(input_ids=inputs, labels=inputs).loss

    return {"lmexp": _train_step(our_loss, ours_optimizer), "hf": _train_step(their_loss, theirs_optimizer)}


def bert_steps(shape: StepShape, overrides: list[str]) -> dict[str, Callable[[], None]]:
    """One MLM training step of lmexp's BERT (NSP off) and of HF's BertForMaskedLM, as closures."""
    from transformers import BertForMaskedLM

    from lmexp.models import bert_hf
    from lmexp.tasks.mlm import mlm_loss_sum

    config, ours, ours_optimizer = _lmexp_side("bert", shape, overrides)

    theirs = BertForMaskedLM(_sdpa(bert_hf.hf_config(config, shape.vocab_size, {"pad_token_id": 0})))
    theirs, theirs_optimizer = _hf_side(theirs)

    # One masked batch for both: 15% of positions carry a label, the last eighth of each row is padding.
    B, T = shape.batch_size, shape.seq_len
    input_ids = torch.randint(5, shape.vocab_size, (B, T))
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[:, T - T // 8 :] = 0
    token_type_ids = torch.zeros(B, T, dtype=torch.long)
    token_type_ids[:, T // 2 :] = 1
    selected = (torch.rand(B, T) < 0.15) & (attention_mask == 1)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))

    def our_loss() -> torch.Tensor:
        mlm_sum, n_masked, *_ = mlm_loss_sum(ours, input_ids, token_type_ids, attention_mask, labels)
        return mlm_sum / n_masked.clamp(min=1)

    def their_loss() -> torch.Tensor:
        return theirs(
            input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask, labels=labels
        ).loss

    return {"lmexp": _train_step(our_loss, ours_optimizer), "hf": _train_step(their_loss, theirs_optimizer)}


def optimizer_steps(shape: StepShape, overrides: list[str]) -> dict[str, Callable[[], None]]:
    """AdamW's step alone over lmexp's GPT parameters: lmexp's choice (fused) against torch's default."""
    from lmexp.config.settings import group

    cfg = lmexp_config("gpt", [*_shape_overrides(shape), *overrides])
    model = group(cfg, "model", vocab_size=shape.vocab_size).build()
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    ours = _lmexp_optimizer(cfg, model)
    default = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)  # fused=None: per-tensor loop
    return {"lmexp": ours.step, "default": default.step}


def _sdpa(hf_config: Any) -> Any:
    hf_config._attn_implementation = "sdpa"  # PyTorch's fused attention, as lmexp uses
    return hf_config


def _hf_side(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The HF peer in training mode with the HF Trainer's default optimizer (fused AdamW)."""
    used = model.config._attn_implementation
    if used != "sdpa":
        raise RuntimeError(f"the Hugging Face peer runs {used!r} attention, not sdpa")
    return model.train(), torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def _shape_overrides(shape: StepShape) -> list[str]:
    return [
        f"model.n_layer={shape.n_layer}",
        f"model.n_head={shape.n_head}",
        f"model.n_embd={shape.n_embd}",
        f"data.block_size={shape.seq_len}",
    ]


# glibc's malloc serves large blocks with fresh mmap'd pages by default and returns freed memory to the
# system, so a step that allocates many large temporaries pays page faults for them again every step
# (expensive in virtual machines). These settings keep freed memory in the heap for reuse, which is what
# the jemalloc/tcmalloc preload that PyTorch's CPU tuning guides suggest achieves.
TUNED_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**34)}


def compare_models(
    smoke: bool, overrides: list[str], suffix: str = "", only: tuple[str, ...] | None = None
) -> list[Result]:
    """lmexp against HF for GPT, BERT and Llama, interleaved in this process; result names end in
    ``suffix``; ``only``: these comparisons (``gpt``, ``gpt_vocab_50257``, ``bert``, ``llama``)."""
    results = []
    for name, build, shape, (rounds, repeats) in (
        ("gpt", gpt_steps, GPT_SHAPE, (9, 3)),
        ("gpt_vocab_50257", gpt_steps, GPT2_VOCAB_SHAPE, (5, 2)),  # ~4x longer steps: fewer of them
        ("bert", bert_steps, BERT_SHAPE, (9, 3)),
        ("llama", llama_steps, GPT_SHAPE, (9, 3)),  # n_kv_head from conf/model/llama.yaml, as HF's config
    ):
        if only is not None and name not in only:
            continue
        if smoke:
            if name == "gpt_vocab_50257":
                continue
            shape, rounds, repeats = SMOKE_SHAPE, 1, 1
        seconds = interleaved(
            build(shape, overrides), rounds=rounds, repeats=repeats, warmup=1 if smoke else 2
        )
        tokens = shape.batch_size * shape.seq_len
        ours, theirs = median(seconds["lmexp"]), median(seconds["hf"])
        ratio = theirs / ours
        round_ratios = [t / o for t, o in zip(seconds["hf"], seconds["lmexp"], strict=True)]
        results.append(
            Result(
                name=f"model_step/{name}{suffix}",
                values={
                    "lmexp_steps_per_sec": 1 / ours,
                    "hf_steps_per_sec": 1 / theirs,
                    "lmexp_tokens_per_sec": tokens / ours,
                    "hf_tokens_per_sec": tokens / theirs,
                    "lmexp_round_spread": spread(seconds["lmexp"]),
                    "hf_round_spread": spread(seconds["hf"]),
                    "lowest_round_ratio": min(round_ratios),
                    "highest_round_ratio": max(round_ratios),
                },
                ratio=ratio,
                ratio_meaning="lmexp / HF steps per second",
                goal=">= 1.2",
                met=ratio >= 1.2,
                notes=[
                    shape.describe(),
                    f"{torch.get_num_threads()} threads, {rounds} rounds x {repeats} steps, median",
                    *([f"lmexp overrides: {' '.join(overrides)}"] if overrides else []),
                    *([f"child process with {_env_text()}"] if suffix else []),
                ],
            )
        )
    return results


def compare_models_with_tuned_malloc(smoke: bool, overrides: list[str]) -> list[Result]:
    """The same comparison in a child process whose glibc malloc keeps freed memory (glibc only)."""
    if platform.libc_ver()[0] != "glibc":
        return []
    command = [sys.executable, "-m", "bench.model_step", *(["--smoke"] if smoke else []), *overrides]
    done = subprocess.run(
        command, env={**os.environ, **TUNED_MALLOC_ENV}, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        last_line = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the tuned-malloc model step failed: {last_line}")
    return [Result(**fields) for fields in json.loads(done.stdout.strip().splitlines()[-1])]


def _env_text() -> str:
    return " ".join(f"{key}={value}" for key, value in TUNED_MALLOC_ENV.items())


def adamw_step(smoke: bool, overrides: list[str]) -> Result:
    """AdamW's step alone: lmexp's optimizer against torch's default."""
    rounds, repeats = (1, 1) if smoke else (9, 3)
    shape = SMOKE_SHAPE if smoke else ADAMW_SHAPE
    seconds = interleaved(optimizer_steps(shape, overrides), rounds=rounds, repeats=5 * repeats, warmup=2)
    ours, default = median(seconds["lmexp"]), median(seconds["default"])
    return Result(
        name="model_step/adamw",
        values={"lmexp_step_ms": 1000 * ours, "torch_default_step_ms": 1000 * default},
        ratio=default / ours,
        ratio_meaning="AdamW steps/s: lmexp's optimizer (fused) / torch's default",
        notes=[f"GPT parameters of {shape.describe()}", "the optimizer step alone, gradients fixed"],
    )


def run(smoke: bool = False, overrides: list[str] | None = None) -> list[Result]:
    """Every comparison; ``smoke`` = tiny shapes and one short round (checks the code, measures nothing)."""
    overrides = overrides or []
    return [
        *compare_models(smoke, overrides),
        *compare_models_with_tuned_malloc(smoke, overrides),
        adamw_step(smoke, overrides),
    ]


def _child_main(argv: list[str]) -> None:
    """``python -m bench.model_step [--smoke] [overrides]``: the model comparison as one JSON line."""
    smoke = "--smoke" in argv
    overrides = [arg for arg in argv if arg != "--smoke"]
    results = compare_models(smoke, overrides, suffix="_malloc_tuned")
    fields = [{"name": r.name, **r.as_dict()} for r in results]
    print(json.dumps(fields))


if __name__ == "__main__":
    from bench.__main__ import _quiet

    _quiet()
    _child_main(sys.argv[1:])
