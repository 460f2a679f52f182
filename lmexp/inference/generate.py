"""``python -m lmexp.generate ckpt_path=<.ckpt> prompt="..."``: sample continuations from a gpt or lstm LM.

The prompt is encoded as a document start (``[eos] prompt``, as in pre-training); generation stops at
the document's closing eos or after ``max_new_tokens``. GPT decodes with a key/value cache (each step
feeds only the new token), the LSTM carries its recurrent state. ``temperature=0`` is greedy decoding
and gives, token for token, what argmax over a full re-computation of the sequence gives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from lmexp.errors import ConfigError
from lmexp.models.registry import context_length


def check_settings(cfg: DictConfig) -> None:
    """One ConfigError naming every bad sampling setting."""
    problems = []

    def positive_int(key: str, minimum: int) -> None:
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            problems.append(f"{key}={value!r}: expected an integer >= {minimum}")

    positive_int("max_new_tokens", 1)
    positive_int("num_samples", 1)
    positive_int("top_k", 0)
    positive_int("seed", 0)
    temperature, top_p = cfg.get("temperature"), cfg.get("top_p")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        problems.append(f"temperature={temperature!r}: expected a number >= 0 (0 = greedy)")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        problems.append(f"top_p={top_p!r}: expected a number in (0, 1]")
    if not isinstance(cfg.get("prompt"), str):
        problems.append(f"prompt={cfg.get('prompt')!r}: expected a string")
    if problems:
        raise ConfigError(problems)


def filter_logits(logits: Any, top_k: int = 0, top_p: float = 1.0) -> Any:
    """Logits (N, V) with everything outside the top ``top_k`` and the ``top_p`` nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p`` (the
    token that crosses it is kept, so at least one token always remains).
    """
    import torch

    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (N, V)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (N, V)
        probs = torch.softmax(sorted_logits, dim=-1)  # (N, V)
        before = probs.cumsum(dim=-1) - probs  # (N, V): probability of the more likely tokens
        drop_sorted = before >= top_p  # (N, V)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)  # (N, V) in vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: Any, temperature: float, top_k: int, top_p: float, generator: Any) -> Any:
    """One token id per row of ``logits`` (N, V): argmax when ``temperature`` is 0, else a sample."""
    import torch

    if temperature == 0:
        return logits.argmax(dim=-1)  # (N,)
    probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)  # (N, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (N,)


def stepper(model: Any, prompt: Any, use_cache: bool = True) -> tuple[Any, Callable[[Any], Any]]:
    """The logits after ``prompt`` (N, P) and a function that feeds new tokens (N, 1) and returns theirs.

    With the cache, the model's own ``start_generation`` (a KV cache for transformers, the recurrent state
    for the LSTM; lmexp/models/registry.py); ``use_cache=False`` re-computes the whole sequence at every
    step (the reference the cache must match).
    """
    import torch

    if use_cache:
        return model.start_generation(prompt)
    sequence = [prompt]

    def recompute(new: Any) -> Any:
        sequence.append(new)
        return model(torch.cat(sequence, dim=1))[:, -1]  # (N, V)

    return model(prompt)[:, -1], recompute


def generate_ids(
    model: Any,
    prompt_ids: list[int],
    max_new_tokens: int,
    vocab_size: int,
    eos_id: int | None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_samples: int = 1,
    generator: Any = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """``num_samples`` continuations of ``prompt_ids`` (each without the prompt, cut before ``eos_id``)."""
    import torch

    device = next(model.parameters()).device
    prompt = torch.tensor([prompt_ids] * num_samples, device=device)  # (N, P)
    new_tokens, finished = [], torch.zeros(num_samples, dtype=torch.bool, device=device)  # (N,)
    with torch.no_grad():
        logits, step = stepper(model, prompt, use_cache)  # (N, V')
        for i in range(max_new_tokens):
            token = next_tokens(logits[:, :vocab_size], temperature, top_k, top_p, generator)  # (N,)
            new_tokens.append(token)
            if eos_id is not None:
                finished |= token == eos_id
            if bool(finished.all()) or i == max_new_tokens - 1:
                break
            logits = step(token[:, None])  # (N, V')
    rows = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in range(num_samples)]
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


def generate(cfg: DictConfig) -> list[str]:
    """Load ``cfg.ckpt_path``, print ``cfg.num_samples`` continuations of ``cfg.prompt``; return the texts."""
    import torch

    from lmexp.inference.restore import require, restore_run

    require(cfg, ckpt_path="a language-model checkpoint, e.g. ckpt_path=<run dir>/checkpoints/last.ckpt")
    check_settings(cfg)
    run = restore_run(cfg.ckpt_path, cfg.paths.cache_dir)
    if run.task_name != "clm":
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: generate needs a causal language model (task=clm); this "
            f"checkpoint is model={run.model_spec.kind} task={run.task_name}"
        )
    model, tokenizer = run.task.model, run.tokenizer
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    prompt_ids = [tokenizer.eos_id, *tokenizer.encode([cfg.prompt])[0]]
    limit, name = context_length(model)  # checked before sampling, so a long request never fails midway
    if limit is not None and len(prompt_ids) + cfg.max_new_tokens - 1 > limit:
        raise ConfigError(
            f"the prompt ({len(prompt_ids)} tokens with the document start) + max_new_tokens="
            f"{cfg.max_new_tokens} exceeds the model's {name}={limit}; shorten one of them"
        )
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    continuations = generate_ids(
        model,
        prompt_ids,
        cfg.max_new_tokens,
        tokenizer.vocab_size,
        tokenizer.eos_id if cfg.stop_at_eos else None,
        cfg.temperature,
        cfg.top_k,
        cfg.top_p,
        cfg.num_samples,
        generator,
    )
    texts = [tokenizer.decode(prompt_ids[1:] + ids) for ids in continuations]
    for i, text in enumerate(texts, start=1):
        print(f"--- sample {i}" if len(texts) > 1 else "---")
        print(text)
    return texts
