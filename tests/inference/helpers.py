"""Helpers of the harness tests: lm-eval requests, scoring by hand, local task files.

Imported as ``inference.helpers`` (``tests/`` is on ``sys.path``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from lm_eval.api.instance import Instance


def requests(kind: str, *arguments: tuple) -> list[Instance]:
    """lm-eval request objects, as the evaluator hands them to a model."""
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def hand_loglikelihood(logits_fn, context_ids: list[int], whole_ids: list[int]) -> tuple[float, bool]:
    """Summed log-prob of ``whole_ids[len(context_ids):]`` from one forward pass over ``whole_ids``."""
    with torch.no_grad():
        logits = logits_fn(torch.tensor([whole_ids[:-1]]))[0].float()  # (T, V')
    log_probs = F.log_softmax(logits, dim=-1)
    positions = range(len(context_ids), len(whole_ids))
    total = sum(float(log_probs[t - 1, whole_ids[t]]) for t in positions)
    greedy = all(int(logits[t - 1].argmax()) == whole_ids[t] for t in positions)
    return total, greedy


def hand_greedy(logits_fn, prompt: list[int], max_new: int, vocab_size: int, eos_id: int) -> list[int]:
    """Greedy continuation by full re-computation of the sequence at every step."""
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            token = int(logits_fn(torch.tensor([sequence]))[0, -1, :vocab_size].argmax())
            if token == eos_id:
                break
            sequence.append(token)
    return sequence[len(prompt) :]


def write_task(directory: Path, name: str, rows: list[dict], **task: object) -> Path:
    """A local lm-eval task: ``rows`` as JSON lines, read by datasets' ``json`` loader (no download)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(directory / "datasets")},
        "test_split": "test",
        **task,
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
