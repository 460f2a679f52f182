"""Prompt -> completion fine-tuning data (``task=sft``): readers, rendering with loss masks, packing.

Rows (JSON lines, :func:`read_sft`), one of::

    {"prompt": "Translate to French: cat", "completion": "chat"}
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

Rendering (:func:`render_examples`) turns a row into token ids and labels ALIGNED with them
(``labels[i] == input_ids[i]`` where token i is learned, -100 elsewhere; :func:`pack_examples` shifts
them into next-token targets). Only completion tokens are learned:

- prompt/completion: ``start_ids + tokens(prompt) + tokens(completion) + [eos]``; the completion's
  tokens and the eos are learned. Prompt and completion are encoded separately, so the prompt's last
  token never merges with the completion's first (the prompt encodes as it will at generation time).
  The texts are joined as they are: sentencepiece starts each with a word boundary, a byte-level BPE
  does not, so for the latter end the prompt (or start the completion) with the separator you want.
- messages, tokenizer WITH a chat template (Hugging Face ``apply_chat_template``): the template's text
  of the whole conversation, encoded at once. Each assistant turn's characters, from the end of the
  template's generation prompt (``add_generation_prompt=True`` on the turns before it) to the end of
  the turn, trailing whitespace excluded, are learned: the reply and the template's end-of-turn marker
  (so the model learns to stop), never the role headers or other turns. The template must render a
  conversation as an extension of its first turns (Hugging Face templates do), else the row is refused.
- messages, tokenizer WITHOUT a chat template: the PLAIN TEMPLATE, built from lmexp's eos token::

      every message:            tokens("{role}:") + tokens(content) + [eos]
      the generation prompt:    tokens("assistant:")

  e.g. ``user: Who built it?</s>assistant: The old king.</s>``. Each assistant turn's content tokens
  and its eos are learned; the ``"assistant:"`` header, system and user turns are not.
  :func:`chat_prompt_ids` gives the ids a model continues at generation time.

Known roles: ``system``, ``user``, ``assistant``; a conversation starts with a system or user turn and
has at least one assistant turn.

Packing (:func:`pack_examples`): rendered examples are placed whole into blocks of ``block_size``
tokens (best fit, longest first), the rest of a block is padding. Per block:

- ``input_ids`` (T,): the examples one after another, then ``pad_id``;
- ``labels`` (T,): next-token targets: ``labels[t]`` is ``input_ids[t + 1]`` when t + 1 is a learned
  token of the SAME example, else -100 (so the last token of an example never predicts the next one);
- ``document_ids`` (T,): 0, 1, 2... for the block's examples, -1 for padding;
- ``position_ids`` (T,): 0, 1, 2... restarting at each example (0 for padding).

An example longer than ``block_size`` is truncated to its first ``block_size`` tokens (the prompt and
the start of the completion are kept; it loses its end, eos included) and counted in
``PackedBlocks.stats.n_truncated``; one left with no learned token is dropped (``n_dropped``);
``overlong="error"`` refuses such an example instead.

Model contract: a model fed packed blocks must not let an example attend to another one. Query t may
attend key s iff ``document_ids[s] == document_ids[t]`` and ``s <= t`` (:func:`document_causal_mask`
builds that boolean mask, True = attend; a varlen kernel can instead take the examples' starts, where
``position_ids == 0``), and positional encodings must use ``position_ids``. Then every example's
logits equal those it gets alone, and the loss is ``cross_entropy(logits, labels, ignore_index=-100)``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lmexp.data.labelled import jsonl_rows, read_labelled_text
from lmexp.data.packing import IGNORE_INDEX
from lmexp.data.text_tokenizer import Span, TextTokenizer, has_chat_template
from lmexp.errors import ConfigError, DataError

CHAT_ROLES = ("system", "user", "assistant")
ASSISTANT = "assistant"
OVERLONG = ("truncate", "error")


# -------------------------------------------------------------------------------------------- records
@dataclass
class SFTRecord:
    """One training row: a prompt and its completion, or a conversation."""

    where: str
    """Config key, file and line of the row, for error messages."""
    prompt: str | None = None
    completion: str | None = None
    messages: list[dict[str, str]] | None = None
    """``[{"role": ..., "content": ...}, ...]``; None for a prompt/completion row."""


def read_sft(path: str | Path, key: str = "data.train_path") -> list[SFTRecord]:
    """The rows of a JSON-lines file of ``prompt``/``completion`` or ``messages`` rows (may be mixed)."""
    path = Path(path).expanduser()
    text = read_labelled_text(path, key)
    records = [_record(row, f"{key}: {path} line {line}") for line, row in jsonl_rows(text, path, key)]
    if not records:
        raise DataError(f"{key}: {path} has no rows; expected prompt/completion or messages rows")
    return records


def _record(row: dict, where: str) -> SFTRecord:
    if "messages" in row:
        if "prompt" in row or "completion" in row:
            raise DataError(f"{where}: has both 'messages' and 'prompt'/'completion'; expected one of them")
        return SFTRecord(where, messages=_checked_messages(row["messages"], where))
    if "prompt" not in row and "completion" not in row:
        raise DataError(f"{where}: has neither 'prompt'/'completion' nor 'messages'; expected one of them")
    for name in ("prompt", "completion"):
        if name not in row:
            raise DataError(f"{where}: has no field {name!r}; expected a prompt and the completion to learn")
        if not isinstance(row[name], str):
            raise DataError(f"{where}: field {name!r} is {type(row[name]).__name__}; expected a string")
    if not row["completion"].strip():
        raise DataError(f"{where}: field 'completion' is empty; expected the text to learn")
    return SFTRecord(where, prompt=row["prompt"], completion=row["completion"])


def _checked_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{where}: field 'messages' is {type(messages).__name__ if messages != [] else 'empty'}; "
            "expected a list of {role, content} objects"
        )
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f"{where}: messages[{i}] is not an object with a string 'role'")
        role, content = message["role"], message.get("content")
        if role not in CHAT_ROLES:
            raise DataError(f"{where}: messages[{i}] has role {role!r}; known roles: {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise DataError(
                f"{where}: messages[{i}] field 'content' is {type(content).__name__}; expected a string"
            )
        checked.append({"role": role, "content": content})
    if not any(m["role"] == ASSISTANT and m["content"].strip() for m in checked):
        raise DataError(f"{where}: no non-empty message has role 'assistant'; expected a reply to learn")
    if checked[0]["role"] == ASSISTANT:
        raise DataError(f"{where}: messages[0] is an assistant turn; expected a system or user turn first")
    return checked


# ------------------------------------------------------------------------------------------ rendering
@dataclass
class RenderedExample:
    """Token ids of one row and its labels, aligned: ``labels[i]`` is ``input_ids[i]`` or -100."""

    input_ids: list[int]
    labels: list[int]
    where: str = ""


def render_examples(
    records: Sequence[SFTRecord], tokenizer: TextTokenizer, start_ids: Sequence[int] = ()
) -> list[RenderedExample]:
    """Render every record as the module docstring describes, in order.

    Args:
        records: rows from :func:`read_sft`.
        tokenizer: any :class:`~lmexp.data.text_tokenizer.TextTokenizer`; one with a chat template
            renders conversations with it.
        start_ids: ids put before every example, never learned. lmexp's gpt and lstm were pre-trained
            on documents that follow an eos, so pass ``(tokenizer.eos_id,)`` for them; it also lets the
            first completion token be learned when the prompt is empty.
    """
    start_ids = [int(i) for i in start_ids]
    rendered: list[RenderedExample | None] = [None] * len(records)
    completions = [i for i, r in enumerate(records) if r.messages is None]
    chats = [i for i, r in enumerate(records) if r.messages is not None]
    for i, example in zip(
        completions, _render_completions([records[i] for i in completions], tokenizer), strict=True
    ):
        rendered[i] = example
    chat_records = [records[i] for i in chats]
    if has_chat_template(tokenizer):
        chat_examples = _render_with_template(chat_records, tokenizer)
    else:
        chat_examples = _render_plain_chats(chat_records, tokenizer)
    for i, example in zip(chats, chat_examples, strict=True):
        rendered[i] = example
    for example in rendered:
        example.input_ids[:0] = start_ids
        example.labels[:0] = [IGNORE_INDEX] * len(start_ids)
    return rendered


def _render_completions(records: list[SFTRecord], tokenizer: TextTokenizer) -> list[RenderedExample]:
    if not records:
        return []
    encoded = tokenizer.encode([r.prompt for r in records] + [r.completion for r in records])
    prompts, completions = encoded[: len(records)], encoded[len(records) :]
    examples = []
    for record, prompt, completion in zip(records, prompts, completions, strict=True):
        learned = [*completion, tokenizer.eos_id]
        examples.append(
            RenderedExample([*prompt, *learned], [IGNORE_INDEX] * len(prompt) + learned, record.where)
        )
    return examples


def _plain_header(role: str) -> str:
    return f"{role}:"


def _render_plain_chats(records: list[SFTRecord], tokenizer: TextTokenizer) -> list[RenderedExample]:
    if not records:
        return []
    headers = dict(
        zip(CHAT_ROLES, tokenizer.encode([_plain_header(role) for role in CHAT_ROLES]), strict=True)
    )
    contents = iter(tokenizer.encode([m["content"] for r in records for m in r.messages]))
    examples = []
    for record in records:
        input_ids: list[int] = []
        labels: list[int] = []
        for message in record.messages:
            turn = [*next(contents), tokenizer.eos_id]
            learned = message["role"] == ASSISTANT
            input_ids += headers[message["role"]] + turn
            labels += [IGNORE_INDEX] * len(headers[message["role"]]) + (
                turn if learned else [IGNORE_INDEX] * len(turn)
            )
        examples.append(RenderedExample(input_ids, labels, record.where))
    return examples


def chat_prompt_ids(
    messages: list[dict[str, str]], tokenizer: TextTokenizer, start_ids: Sequence[int] = ()
) -> list[int]:
    """The ids a model continues to reply to ``messages``: the conversation and the generation prompt."""
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return [*start_ids, *tokenizer.encode([text])[0]]
    ids = list(start_ids)
    encoded = tokenizer.encode(
        [_plain_header(m["role"]) for m in messages] + [m["content"] for m in messages]
    )
    for header, content in zip(encoded[: len(messages)], encoded[len(messages) :], strict=True):
        ids += header + content + [tokenizer.eos_id]
    return ids + tokenizer.encode([_plain_header(ASSISTANT)])[0]


def _render_with_template(records: list[SFTRecord], tokenizer: Any) -> list[RenderedExample]:
    if not records:
        return []
    texts, learned_ranges = [], []
    for record in records:
        text, ranges = _template_text_and_replies(record, tokenizer)
        texts.append(text)
        learned_ranges.append(ranges)
    examples = []
    for record, (ids, spans), ranges in zip(
        records, tokenizer.encode_with_offsets(texts), learned_ranges, strict=True
    ):
        labels = [
            token if _in_ranges(span, ranges) else IGNORE_INDEX
            for token, span in zip(ids, spans, strict=True)
        ]
        examples.append(RenderedExample(list(ids), labels, record.where))
    return examples


def _template_text_and_replies(record: SFTRecord, tokenizer: Any) -> tuple[str, list[Span]]:
    """The conversation's text and the character range of each assistant reply in it."""
    messages = record.messages
    full = _apply_template(tokenizer, messages, False, record.where)
    ranges = []
    for k, message in enumerate(messages):
        if message["role"] != ASSISTANT:
            continue
        before = _apply_template(tokenizer, messages[:k], True, record.where)
        through = _apply_template(tokenizer, messages[: k + 1], False, record.where)
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(
                f"{record.where}: the tokenizer's chat template renders the turns before messages[{k}] "
                "differently once more turns follow; expected each rendering to extend the shorter one"
            )
        ranges.append((len(before), len(through.rstrip())))
    return full, ranges


def _apply_template(
    tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool, where: str
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # jinja2 raises TemplateError (and templates raise their own) on refused input
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DataError(
            f"{where}: the tokenizer's chat template refused the conversation ({reason})"
        ) from None


def _in_ranges(span: Span, ranges: list[Span]) -> bool:
    """Whether a token lies in a learned range: it overlaps one, or (empty span) starts inside one."""
    start, end = span
    if end > start:
        return any(start < stop and end > begin for begin, stop in ranges)
    return any(begin <= start < stop for begin, stop in ranges)


# -------------------------------------------------------------------------------------------- packing
@dataclass
class PackingStats:
    """What packing did to the examples."""

    block_size: int
    n_examples: int
    """Examples given."""
    n_blocks: int = 0
    n_tokens: int = 0
    """Real (non-padding) tokens in the blocks."""
    n_learned: int = 0
    """Targets that are not -100: the tokens the loss covers."""
    n_truncated: int = 0
    """Examples longer than a block, cut to their first ``block_size`` tokens."""
    n_dropped: int = 0
    """Truncated examples left with no learned token, not packed."""
    dropped: list[str] = field(default_factory=list)
    """Where the dropped examples come from (file and line), the first 10."""

    @property
    def fill(self) -> float:
        """Fraction of the blocks' positions holding real tokens."""
        return self.n_tokens / max(1, self.n_blocks * self.block_size)


class PackedBlocks(Dataset):
    """Packed blocks (see the module docstring); item i is a dict of (T,) int64 tensors."""

    def __init__(
        self,
        input_ids: np.ndarray,
        labels: np.ndarray,
        document_ids: np.ndarray,
        position_ids: np.ndarray,
        stats: PackingStats,
    ) -> None:
        self.input_ids, self.labels = input_ids, labels
        self.document_ids, self.position_ids = document_ids, position_ids
        self.stats = stats

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.from_numpy(self.input_ids[index].astype(np.int64)),
            "labels": torch.from_numpy(self.labels[index].astype(np.int64)),
            "document_ids": torch.from_numpy(self.document_ids[index].astype(np.int64)),
            "position_ids": torch.from_numpy(self.position_ids[index].astype(np.int64)),
        }


def pack_examples(
    examples: Sequence[RenderedExample], block_size: int, pad_id: int, overlong: str = "truncate"
) -> PackedBlocks:
    """Pack rendered examples into blocks of ``block_size`` tokens; see the module docstring.

    Args:
        examples: from :func:`render_examples`.
        block_size: tokens per block (``data.block_size``).
        pad_id: the id that fills the end of a block.
        overlong: ``"truncate"`` (keep the first ``block_size`` tokens) or ``"error"`` (refuse an
            example longer than a block, naming its file and line).
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ConfigError(f"data.block_size={block_size!r}: expected an integer >= 2")
    if overlong not in OVERLONG:
        raise ConfigError(f"data.overlong={overlong!r}: expected one of {', '.join(OVERLONG)}")
    stats = PackingStats(block_size=block_size, n_examples=len(examples))
    kept = []
    for example in examples:
        if len(example.input_ids) > block_size:
            if overlong == "error":
                raise DataError(
                    f"{example.where}: the example has {len(example.input_ids)} tokens, more than "
                    f"data.block_size={block_size}; shorten it or raise data.block_size"
                )
            stats.n_truncated += 1
            example = RenderedExample(
                example.input_ids[:block_size], example.labels[:block_size], example.where
            )
        if example.labels[1:].count(IGNORE_INDEX) == len(example.labels) - 1:  # nothing left to learn
            stats.n_dropped += 1
            if len(stats.dropped) < 10:
                stats.dropped.append(example.where)
            continue
        kept.append(example)
    if not kept:
        raise DataError(
            f"no example has a completion token within data.block_size={block_size} tokens "
            f"({stats.n_dropped} dropped, e.g. {stats.dropped[0] if stats.dropped else 'none given'})"
        )
    blocks = best_fit_blocks([len(e.input_ids) for e in kept], block_size)
    shape = (len(blocks), block_size)
    input_ids = np.full(shape, pad_id, dtype=np.int32)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int32)
    document_ids = np.full(shape, -1, dtype=np.int32)
    position_ids = np.zeros(shape, dtype=np.int32)
    for row, members in enumerate(blocks):
        offset = 0
        for document, index in enumerate(members):
            example = kept[index]
            n = len(example.input_ids)
            span = slice(offset, offset + n)
            input_ids[row, span] = example.input_ids
            labels[row, offset : offset + n - 1] = example.labels[1:]  # next-token targets inside the example
            document_ids[row, span] = document
            position_ids[row, span] = np.arange(n)
            offset += n
    stats.n_blocks = len(blocks)
    stats.n_tokens = int((document_ids >= 0).sum())
    stats.n_learned = int((labels != IGNORE_INDEX).sum())
    return PackedBlocks(input_ids, labels, document_ids, position_ids, stats)


def best_fit_blocks(lengths: Sequence[int], block_size: int) -> list[list[int]]:
    """Indices of the items in each block: longest first, each into the fullest block it fits (best fit
    decreasing, deterministic). Every length must be at most ``block_size``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    blocks: list[list[int]] = []
    room: list[
        tuple[int, int]
    ] = []  # (free tokens, block), sorted: the fullest block that fits is found by bisection
    for i in order:
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            blocks.append([i])
            free, block = block_size - lengths[i], len(blocks) - 1
        else:
            free, block = room.pop(at)
            blocks[block].append(i)
            free -= lengths[i]
        if free > 0:
            bisect.insort(room, (free, block))
    return blocks


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool mask, True where query t may attend key s:
    the same document and ``s <= t``. Suits ``F.scaled_dot_product_attention(attn_mask=...)``."""
    T = document_ids.shape[-1]
    same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()  # (T, T)
    return (same & causal)[:, None]  # (B, 1, T, T)
