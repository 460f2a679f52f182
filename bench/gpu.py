"""GPU: lmexp's full ``lmexp.train`` path against Hugging Face's models in a plain loop, and FSDP on one GPU.

Runs (bf16-mixed, ``torch.compile``, fused AdamW on both sides):

- ``gpu/gpt``: GPT-2 small with GPT-2's 50,257-token vocabulary (124M parameters), seq 1024, batch 16
  against ``GPT2LMHeadModel`` with the same dimensions;
- ``gpu/llama``: ``model=llama-124m`` (lmexp's Llama-style decoder) against ``LlamaForCausalLM`` with the same
  dimensions (its HF config comes from lmexp's adapter, lmexp/models/llama_hf.py), same vocabulary and shape;
- ``gpu/bert``: BERT-base masked LM at seq 128, batch 128 against ``BertForMaskedLM``;
- ``gpu/fsdp``: GPT-2 small under ``trainer=fsdp`` on the one GPU (FSDP2 over a single rank): tokens/s
  against ``trainer=gpu``, then its sharded checkpoint resumed by a second run and exported to Hugging Face.

lmexp's figures are the run's own (``perf/tokens_per_sec`` and ``perf/mfu``: the last 50 steps, so
compilation and start-up drop out; ``perf/peak_memory_gib``); the peers are timed after a warm-up that
includes compilation. ``--smoke`` runs the same code on the CPU with tiny sizes and without compile, so it
cannot rot (it measures nothing). bench/gpu_check.sh runs this and the GPU-only tests as one device job.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import Result
from lmexp.config.compose import compose_job

STEPS = 200  # lmexp's figures come from the last 50 of them
GPU_RUN = [
    "trainer=gpu",
    "compile=true",
    f"trainer.max_steps={STEPS}",
    f"trainer.val_check_interval={STEPS}",
    "trainer.limit_val_batches=4",
    "trainer.log_every_n_steps=25",
    "run_test=false",
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
]
GPT2_VOCAB = 50257
# name: (lmexp overrides, batch, seq)
GPU_JOBS: dict[str, tuple[list[str], int, int]] = {
    "gpt": (
        ["model=gpt2-small", f"model.vocab_size={GPT2_VOCAB}", "data.block_size=1024", "data.batch_size=16"],
        16,
        1024,
    ),
    "llama": (
        ["model=llama-124m", f"model.vocab_size={GPT2_VOCAB}", "data.block_size=1024", "data.batch_size=16"],
        16,
        1024,
    ),
    "bert": (["model=bert-base", "task.nsp=false", "data.block_size=128", "data.batch_size=128"], 128, 128),
}
SMOKE_RUN = [
    "trainer.accelerator=cpu",
    "trainer.precision=bf16-mixed",
    "compile=false",
    "debug=fast",
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
]
SMOKE_JOBS: dict[str, tuple[list[str], int, int]] = {
    "gpt": (["model=gpt", "model.n_layer=1", "model.n_head=2", "model.n_embd=32"], 8, 32),
    "llama": (
        ["model=llama", "model.n_layer=1", "model.n_head=2", "model.n_kv_head=1", "model.n_embd=32"],
        8,
        32,
    ),
    "bert": (["model=bert", "task.nsp=false", "model.n_layer=1", "model.n_embd=32"], 8, 32),
}


# ---------------------------------------------------------------------------------------------- lmexp
def lmexp_run(job: list[str], run_dir: Path | None = None) -> dict[str, float]:
    """One ``lmexp.train`` job; its metrics.json figures."""
    from lmexp.train import train

    _reset_peak_memory()
    if run_dir is not None:
        return train(compose_job(job, run_dir))
    with tempfile.TemporaryDirectory(prefix="lmexp-bench-") as scratch:
        return train(compose_job(job, Path(scratch)))


def _reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------------------------- HF
def hf_model(name: str, job: list[str]) -> torch.nn.Module:
    """Hugging Face's model of the same architecture as lmexp's job, built by lmexp's own adapters."""
    from lmexp.config.settings import group
    from lmexp.models import bert_hf, gpt_hf, llama_hf

    cfg = compose_job(job, tempfile.mkdtemp(prefix="lmexp-bench-"))
    vocab = cfg.model.vocab_size or int(cfg.tokenizer.vocab_size)
    config = group(cfg, "model", vocab_size=vocab)
    if name == "bert":
        import transformers

        hf_config = bert_hf.hf_config(config, vocab, {"pad_token_id": 0})
        hf_class = transformers.BertForMaskedLM
    else:
        import transformers

        adapter = gpt_hf if name == "gpt" else llama_hf
        hf_config = adapter.hf_config(
            config, vocab, {"bos_token_id": 3, "eos_token_id": 3, "pad_token_id": 0}
        )
        hf_class = getattr(transformers, adapter.HF_CLASSES["clm"])
    hf_config._attn_implementation = "sdpa"  # PyTorch's fused attention, as lmexp uses
    return hf_class(hf_config)


def hf_run(model: torch.nn.Module, name: str, batch: int, seq: int, device: str, compile: bool) -> dict:
    """Tokens/s and peak memory of HF's model in a plain bf16-autocast loop with fused AdamW."""
    _reset_peak_memory()
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step_model = torch.compile(model) if compile else model
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    labels = ids if name != "bert" else torch.where(torch.rand(batch, seq, device=device) < 0.15, ids, -100)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = step_model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps, warmup = (2, 1) if device == "cpu" else (50, 20)
    for _ in range(warmup):
        step()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    rate = batch * seq * steps / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"tokens_per_sec": rate, "peak_memory_gib": peak}


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- FSDP
def fsdp_check(base: list[str], plain_rate: float, smoke: bool) -> Result:
    """``trainer=fsdp`` on one device: speed against ``trainer=gpu``, then resume and export its
    checkpoint."""
    from lmexp.inference.export import export

    fsdp = ["trainer=fsdp", "trainer.devices=1", "trainer.strategy.state_dict=sharded"]
    if smoke:
        fsdp += ["trainer.accelerator=cpu", "trainer.precision=bf16-mixed"]
    half = STEPS // 2 if not smoke else 2
    with tempfile.TemporaryDirectory(prefix="lmexp-bench-fsdp-") as scratch:
        run_dir = Path(scratch) / "run"
        first = lmexp_run([*base, *fsdp, f"callbacks.checkpoint.every_n_train_steps={half}"], run_dir)
        checkpoint = run_dir / "checkpoints" / "last.ckpt"
        sharded = checkpoint.is_dir()
        # A second job on the same run dir with more steps continues from the sharded checkpoint.
        more = (STEPS if not smoke else 4) + half
        resumed = lmexp_run([*base, *fsdp, f"trainer.max_steps={more}"], run_dir)
        out = Path(scratch) / "hf"
        export(compose_job([f"ckpt_path={checkpoint}", f"out={out}"], Path(scratch), config_name="export"))
        exported = (out / "config.json").is_file()
    rate = first.get("perf/tokens_per_sec", float("nan"))
    return Result(
        name="gpu/fsdp",
        values={
            "fsdp_tokens_per_sec": rate,
            "gpu_tokens_per_sec": plain_rate,
            "fsdp_peak_memory_gib": first.get("perf/peak_memory_gib", float("nan")),
            "sharded_checkpoint": float(sharded),
            "resumed_to_step": resumed.get("perf/global_step", float("nan")),
            "exported": float(exported),
        },
        ratio=rate / plain_rate,
        ratio_meaning="trainer=fsdp / trainer=gpu tokens/s (one device)",
        goal=">= 0.9",
        met=None if smoke else rate / plain_rate >= 0.9 and sharded and exported,
        notes=["FSDP2 over one rank; sharded last.ckpt, resumed by a second job, exported to Hugging Face"],
    )


# ------------------------------------------------------------------------------------------------ run
def run(smoke: bool = False, overrides: list[str] | None = None) -> list[Result]:
    if not smoke and not torch.cuda.is_available():
        from lmexp.errors import UserError

        raise UserError("python -m bench --gpu needs a CUDA GPU (none here); --smoke checks its code on CPUs")
    device = "cpu" if smoke else "cuda"
    base_run, jobs = (SMOKE_RUN, SMOKE_JOBS) if smoke else (GPU_RUN, GPU_JOBS)
    results, gpt_rate, gpt_base = [], float("nan"), []
    for name, (sizes, batch, seq) in jobs.items():
        job = [*base_run, *sizes, *(overrides or [])]
        ours = lmexp_run(job)
        theirs = hf_run(hf_model(name, job), name, batch, seq, device, compile=not smoke)
        rate = ours.get("perf/tokens_per_sec", float("nan"))
        if name == "gpt":
            gpt_rate, gpt_base = rate, job
        results.append(
            Result(
                name=f"gpu/{name}",
                values={
                    "lmexp_tokens_per_sec": rate,
                    "hf_tokens_per_sec": theirs["tokens_per_sec"],
                    "lmexp_mfu": ours.get("perf/mfu", float("nan")),
                    "lmexp_peak_memory_gib": ours.get("perf/peak_memory_gib", float("nan")),
                    "hf_peak_memory_gib": theirs["peak_memory_gib"],
                },
                ratio=rate / theirs["tokens_per_sec"],
                ratio_meaning="lmexp full path / HF plain loop tokens/s",
                goal=_goal(name),
                met=_met(name, rate, ours, theirs["tokens_per_sec"]) if not smoke else None,
                notes=[f"lmexp.train {' '.join(job)}", f"HF: batch {batch}, seq {seq}, bf16 autocast"],
            )
        )
    results.append(fsdp_check(gpt_base, gpt_rate, smoke))
    return results


def _goal(name: str) -> str:
    return ">= 450k tokens/s, MFU >= 0.40, >= 1.3x HF" if name == "gpt" else ">= 1.0x HF"


def _met(name: str, rate: float, ours: dict[str, Any], hf_rate: float) -> bool:
    if name == "gpt":
        return rate >= 450_000 and ours.get("perf/mfu", 0.0) >= 0.40 and rate >= 1.3 * hf_rate
    return rate >= hf_rate
