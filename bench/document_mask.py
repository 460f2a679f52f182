"""Document masking: a training step on packed blocks with the block-causal mask against plain causal packing.

Both sides train the same model on the same packed blocks; one passes ``document_ids`` (each token attends
only to its own document, positions restart: lmexp/models/document_mask.py), the other does not (SDPA's
``is_causal``). The ratio is the price of the mask: building it, and SDPA with an explicit (B, 1, T, T)
boolean mask instead of its causal kernel. Documents are 16 to 128 tokens long (uniform, seeded), about the
built-in corpus's ~50 words per document, each starting with its eos as lmexp's packing does.

``python -m bench.document_mask`` (``--smoke`` for one tiny round) prints the table.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from bench.common import Result, interleaved, median, spread

EOS = 2
VOCAB = 4096  # the default BPE tokenizer's size


@dataclass
class MaskShape:
    """One model size and batch shape."""

    label: str
    n_layer: int
    n_head: int
    n_embd: int
    seq_len: int
    batch_size: int

    def describe(self) -> str:
        return (
            f"{self.n_layer} layers x {self.n_embd} wide, {self.n_head} heads, seq {self.seq_len}, "
            f"batch {self.batch_size}, vocab {VOCAB}, fp32"
        )


# The default run's model and batch (model=gpt, data.block_size=128, data.batch_size=32), and a larger
# CPU size with longer blocks, where attention is a bigger share of the step.
SHAPES = (
    MaskShape("nano", n_layer=4, n_head=4, n_embd=128, seq_len=128, batch_size=32),
    MaskShape("4x256-seq512", n_layer=4, n_head=4, n_embd=256, seq_len=512, batch_size=4),
)
SMOKE_SHAPE = MaskShape("smoke", n_layer=1, n_head=2, n_embd=32, seq_len=32, batch_size=2)


def packed_blocks(batch_size: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` (B, T): random tokens in documents of 16-128 tokens, each opened by eos."""
    generator = torch.Generator().manual_seed(seed)
    stream_length = batch_size * seq_len + 1
    stream = torch.randint(3, VOCAB, (stream_length,), generator=generator)
    position = 0
    while position < stream_length:
        stream[position] = EOS
        position += int(torch.randint(16, 129, (), generator=generator))
    offset = int(torch.randint(0, 64, (), generator=generator))  # blocks start mid-document, as they do
    stream = torch.cat([stream[offset:], stream[:offset]])
    inputs = stream[:-1].view(batch_size, seq_len)
    labels = stream[1:].view(batch_size, seq_len)
    return inputs, labels


def training_step(
    model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, masked: bool
) -> Callable:
    """One forward (loss from the hidden states, as the task computes it), backward and AdamW step."""
    from lmexp.models.document_mask import document_ids_from_eos
    from lmexp.tasks.optim import decay_parameter_groups

    optimizer = torch.optim.AdamW(decay_parameter_groups(model, 0.1), lr=1e-4)
    document_ids = document_ids_from_eos(inputs, EOS) if masked else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nll_sum, _ = model(inputs, labels=labels, document_ids=document_ids)
        (nll_sum / labels.numel()).backward()
        optimizer.step()

    return step


def _config(family: str, shape: MaskShape):
    from lmexp.models.gpt import GPTConfig
    from lmexp.models.llama import LlamaConfig

    sizes = dict(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd, max_seq_len=shape.seq_len)
    if family == "gpt":
        return GPTConfig(vocab_size=VOCAB, **sizes)
    return LlamaConfig(vocab_size=VOCAB, n_kv_head=max(1, shape.n_head // 2), **sizes)


def compare(family: str, shape: MaskShape, rounds: int, repeats: int) -> Result:
    """Median step time with and without the document mask for one model and size."""
    inputs, labels = packed_blocks(shape.batch_size, shape.seq_len)
    steps = {}
    for masked in (False, True):
        torch.manual_seed(0)
        model = _config(family, shape).build().train()
        steps["masked" if masked else "plain"] = training_step(model, inputs, labels, masked)
    seconds = interleaved(steps, rounds=rounds, repeats=repeats)
    plain, masked = median(seconds["plain"]), median(seconds["masked"])
    # Both sides of a round ran back to back, so a round's ratio cancels load that drifts between rounds
    # (other jobs on a shared machine); the median over rounds is the headline figure.
    round_ratios = [m / p for m, p in zip(seconds["masked"], seconds["plain"], strict=True)]
    n_documents = int((inputs == EOS).sum()) + shape.batch_size  # + each block's leading piece
    return Result(
        name=f"document_mask/{family}/{shape.label}",
        values={
            "plain_step_ms": plain * 1e3,
            "masked_step_ms": masked * 1e3,
            "plain_spread": spread(seconds["plain"]),
            "masked_spread": spread(seconds["masked"]),
            "ratio_of_medians": masked / plain,
            "round_ratio_min": min(round_ratios),
            "round_ratio_max": max(round_ratios),
        },
        ratio=median(round_ratios),
        ratio_meaning="step time with the document mask / plain causal packing (median over rounds)",
        goal="report",
        notes=[
            shape.describe(),
            f"{rounds} interleaved rounds x {repeats} steps, {torch.get_num_threads()} threads",
            f"{n_documents} document pieces in {shape.batch_size} blocks",
        ],
    )


def results(smoke: bool) -> Iterator[Result]:
    """Both models at both sizes, one result at a time."""
    shapes = (SMOKE_SHAPE,) if smoke else SHAPES
    rounds, repeats = (1, 1) if smoke else (9, 2)
    for shape in shapes:
        for family in ("gpt", "llama"):
            yield compare(family, shape, rounds, repeats)


def run(smoke: bool = False, overrides: list[str] | None = None) -> list[Result]:
    """Both models at both sizes (``overrides`` is accepted for the suite's interface and unused)."""
    return list(results(smoke))


def main(argv: list[str]) -> None:
    from bench.common import machine

    print(machine(), flush=True)
    for result in results(smoke="--smoke" in argv):
        values = ", ".join(f"{key}={value:.3g}" for key, value in result.values.items())
        print(f"{result.name}: ratio {result.ratio:.3f} ({result.ratio_meaning}); {values}")
        for note in result.notes:
            print(f"    {note}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
