"""GPU: GPT-2 small (124M) at seq 1024 and BERT-base MLM at seq 128, bf16-mixed + torch.compile.

lmexp runs its full ``lmexp.train`` path (``trainer=gpu compile=true``) and reports tokens/s and MFU from
its own throughput callback (``perf/tokens_per_sec``, ``perf/mfu`` in metrics.json: the last 50 steps).
The peer is Hugging Face's ``GPT2LMHeadModel`` / ``BertForMaskedLM`` in a plain loop under the same
settings: bf16 autocast, ``torch.compile``, fused AdamW, same batch and sequence length, timed after
a warm-up that includes compilation. ``model.vocab_size=50257`` gives lmexp GPT-2's embedding (padded
to 50304), so both models have GPT-2's 124M parameters.

Needs a CUDA GPU; ``--smoke`` runs the same code on the CPU with tiny sizes, without compile, to keep it
working (it measures nothing).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from bench.common import Result
from lmexp.config.compose import compose_job

GPU_RUN = [
    "trainer=gpu",
    "compile=true",
    "trainer.max_steps=200",
    "trainer.val_check_interval=200",
    "trainer.limit_val_batches=4",
    "trainer.log_every_n_steps=25",
    "run_test=false",
    "logger=csv",
    "callbacks.progress_bar=null",
]
MODEL_CHOICE = {"gpt": ["model=gpt2-small"], "bert": ["model=bert-base", "task.nsp=false"]}
GPU_SIZES = {  # (overrides, batch, seq)
    "gpt": (["model.vocab_size=50257", "data.block_size=1024", "data.batch_size=16"], 16, 1024),
    "bert": (["data.block_size=128", "data.batch_size=128"], 128, 128),
}
SMOKE = [
    "trainer.accelerator=cpu",
    "trainer.precision=bf16-mixed",
    "compile=false",
    "debug=fast",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
]


def lmexp_rate(job: list[str]) -> dict[str, float]:
    from lmexp.train import train

    with tempfile.TemporaryDirectory(prefix="lmexp-bench-") as run_dir:
        metrics = train(compose_job(job, Path(run_dir)))
    return {key: metrics[key] for key in ("perf/tokens_per_sec", "perf/mfu") if key in metrics}


def hf_rate(
    model_name: str, batch: int, seq: int, device: str, compile: bool, steps: int, warmup: int
) -> float:
    """Tokens/s of HF's model in a plain bf16-autocast loop with fused AdamW."""
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    if model_name == "gpt":
        config = (
            GPT2Config(attn_implementation="sdpa")
            if device == "cuda"
            else GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=512, attn_implementation="sdpa")
        )
        model = GPT2LMHeadModel(config)
    else:
        config = (
            BertConfig(attn_implementation="sdpa")
            if device == "cuda"
            else BertConfig(
                num_hidden_layers=1,
                num_attention_heads=2,
                hidden_size=32,
                intermediate_size=128,
                vocab_size=512,
                attn_implementation="sdpa",
            )
        )
        model = BertForMaskedLM(config)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step_model = torch.compile(model) if compile else model
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    labels = (
        ids if model_name == "gpt" else torch.where(torch.rand(batch, seq, device=device) < 0.15, ids, -100)
    )

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = step_model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * seq * steps / (time.perf_counter() - start)


def run(smoke: bool = False, overrides: list[str] | None = None) -> list[Result]:
    if not smoke and not torch.cuda.is_available():
        from lmexp.errors import UserError

        raise UserError("python -m bench --gpu needs a CUDA GPU (none here); --smoke checks its code on CPUs")
    device = "cpu" if smoke else "cuda"
    results = []
    for name in ("gpt", "bert"):
        if smoke:
            job, batch, seq = [*MODEL_CHOICE[name], *SMOKE], 8, 32
        else:
            sizes, batch, seq = GPU_SIZES[name]
            job = [*GPU_RUN, *MODEL_CHOICE[name], *sizes]
        ours = lmexp_rate([*job, *(overrides or [])])
        theirs = hf_rate(
            name, batch, seq, device, compile=not smoke, steps=2 if smoke else 50, warmup=1 if smoke else 20
        )
        rate = ours.get("perf/tokens_per_sec", float("nan"))
        results.append(
            Result(
                name=f"gpu/{name}",
                values={
                    "lmexp_tokens_per_sec": rate,
                    "hf_tokens_per_sec": theirs,
                    "lmexp_mfu": ours.get("perf/mfu", float("nan")),
                },
                ratio=rate / theirs,
                ratio_meaning="lmexp full path / HF plain loop tokens/s",
                goal=">= 450k tokens/s on one H100" if name == "gpt" else "",
                met=(rate >= 450_000) if name == "gpt" and not smoke else None,
                notes=[
                    f"lmexp.train {' '.join(job)}",
                    f"HF: batch {batch}, seq {seq}, bf16 autocast, compile={not smoke}",
                ],
            )
        )
    return results
