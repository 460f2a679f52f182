"""Prompt -> completion data: readers and errors, loss masks of both templates, packing without leaks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmexp.data.sft import (
    RenderedExample,
    SFTRecord,
    best_fit_blocks,
    chat_prompt_ids,
    document_causal_mask,
    pack_examples,
    read_sft,
    render_examples,
)
from lmexp.data.text_tokenizer import HFTokenizer
from lmexp.errors import ConfigError, DataError
from tests.data.conftest import WORDS

IGNORE = -100
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who wrote the poem?"},
    {"role": "assistant", "content": "The old queen."},
    {"role": "user", "content": "When did the queen write it?"},
    {"role": "assistant", "content": "In 1901."},
]


@pytest.fixture(params=["spm", "hf"])
def tokenizer(request: pytest.FixtureRequest):
    return request.getfixturevalue(f"{request.param}_tokenizer")


@pytest.fixture(params=["template", "plain"])
def chat_tokenizer(request: pytest.FixtureRequest, hf_tokenizer: HFTokenizer, monkeypatch) -> HFTokenizer:
    """The HF tokenizer with its chat template, or with none (so the plain template is used)."""
    if request.param == "plain":
        monkeypatch.setattr(hf_tokenizer.hf, "chat_template", None)
    return hf_tokenizer


def learned(example: RenderedExample) -> list[int]:
    return [label for label in example.labels if label != IGNORE]


def same_length_variant(tokenizer, text: str, word: str) -> str:
    """``text`` with ``word`` replaced by another word that encodes to as many tokens (other ids)."""
    ids = tokenizer.encode([text])[0]
    for other in WORDS:
        variant = text.replace(word, other)
        variant_ids = tokenizer.encode([variant])[0]
        if len(variant_ids) == len(ids) and variant_ids != ids:
            return variant
    raise AssertionError(f"no same-length replacement for {word!r}")


# ---------------------------------------------------------------------------------------------- readers
def test_reads_both_kinds(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": "Q: who?", "completion": " The king."}, {"messages": CHAT}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    first, second = read_sft(path)
    assert (first.prompt, first.completion, first.messages) == ("Q: who?", " The king.", None)
    assert second.messages == CHAT and second.where == f"data.train_path: {path} line 2"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "x"}, "has no field 'completion'; expected a prompt and the completion to learn"),
        ({"completion": "x"}, "has no field 'prompt'"),
        ({"prompt": 1, "completion": "x"}, "field 'prompt' is int; expected a string"),
        ({"prompt": "x", "completion": " "}, "field 'completion' is empty; expected the text to learn"),
        ({"text": "x"}, "has neither 'prompt'/'completion' nor 'messages'"),
        ({"messages": CHAT, "prompt": "x"}, "has both 'messages' and 'prompt'/'completion'"),
        ({"messages": "hello"}, "field 'messages' is str; expected a list of {role, content} objects"),
        ({"messages": []}, "field 'messages' is empty"),
        ({"messages": [CHAT[1]]}, "no non-empty message has role 'assistant'; expected a reply to learn"),
        (
            {"messages": [CHAT[1], {"role": "bot", "content": "x"}]},
            "messages[1] has role 'bot'; known roles: system, user, assistant",
        ),
        ({"messages": [CHAT[1], {"role": "assistant", "content": 3}]}, "messages[1] field 'content' is int"),
        ({"messages": [CHAT[1], "hi"]}, "messages[1] is not an object with a string 'role'"),
        ({"messages": CHAT[2:]}, "messages[0] is an assistant turn; expected a system or user turn first"),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, row: dict, message: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(
        json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps(row) + "\n", encoding="utf-8"
    )
    with pytest.raises(DataError) as err:
        read_sft(path, "data.val_path")
    text = str(err.value)
    assert text.startswith(f"data.val_path: {path} line 2: ") and message in text and "\n" not in text


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="has no rows"):
        read_sft(tmp_path / "empty.jsonl")


# -------------------------------------------------------------------------------------------- rendering
def test_prompt_completion_layout(tokenizer) -> None:
    record = SFTRecord("row", prompt="Who built the castle?", completion=" The old king.")
    (example,) = render_examples([record], tokenizer, start_ids=(tokenizer.eos_id,))
    prompt, completion = tokenizer.encode([record.prompt, record.completion])
    eos = tokenizer.eos_id
    assert example.input_ids == [eos, *prompt, *completion, eos]
    assert example.labels == [IGNORE] * (1 + len(prompt)) + completion + [eos]
    assert example.where == "row"


def test_changing_a_prompt_token_changes_no_label(tokenizer) -> None:
    prompt = "Who built the castle by the river?"
    variant = same_length_variant(tokenizer, prompt, "castle")
    records = [SFTRecord("a", prompt=p, completion=" The old king.") for p in (prompt, variant)]
    original, changed = render_examples(records, tokenizer)
    assert original.input_ids != changed.input_ids
    assert original.labels == changed.labels
    packed = [pack_examples([e], block_size=64, pad_id=tokenizer.pad_id) for e in (original, changed)]
    assert torch.equal(packed[0][0]["labels"], packed[1][0]["labels"])
    assert not torch.equal(packed[0][0]["input_ids"], packed[1][0]["input_ids"])


def test_chat_template_learns_the_replies_and_their_end_markers(hf_tokenizer: HFTokenizer) -> None:
    (example,) = render_examples([SFTRecord("chat", messages=CHAT)], hf_tokenizer)
    text = hf_tokenizer.apply_chat_template(CHAT)
    assert example.input_ids == hf_tokenizer.encode([text])[0]
    # the learned tokens are exactly the two replies with their end-of-turn markers
    assert hf_tokenizer.hf.decode(learned(example)) == "The old queen.<|im_end|>In 1901.<|im_end|>"
    header = hf_tokenizer.encode(["<|im_start|>assistant\n"])[0]
    first_reply = example.labels.index(next(label for label in example.labels if label != IGNORE))
    assert example.input_ids[first_reply - len(header) : first_reply] == header
    assert all(label == IGNORE for label in example.labels[:first_reply])


def test_plain_template_layout(tokenizer, monkeypatch) -> None:
    if isinstance(tokenizer, HFTokenizer):
        monkeypatch.setattr(tokenizer.hf, "chat_template", None)
    (example,) = render_examples([SFTRecord("chat", messages=CHAT)], tokenizer)
    eos = tokenizer.eos_id
    expected_ids, expected_learned = [], []
    for message in CHAT:
        header, content = tokenizer.encode([f"{message['role']}:", message["content"]])
        expected_ids += header + content + [eos]
        if message["role"] == "assistant":
            expected_learned += content + [eos]
    assert example.input_ids == expected_ids
    assert learned(example) == expected_learned
    assert [label for label in example.labels if label != IGNORE] == expected_learned


def test_changing_a_user_token_changes_no_label(chat_tokenizer) -> None:
    variant = [dict(m) for m in CHAT]
    variant[3]["content"] = same_length_variant(chat_tokenizer, CHAT[3]["content"], "queen")
    original, changed = render_examples(
        [SFTRecord("a", messages=CHAT), SFTRecord("b", messages=variant)], chat_tokenizer
    )
    assert original.input_ids != changed.input_ids and len(original.input_ids) == len(changed.input_ids)
    assert original.labels == changed.labels


def test_generation_prompt_is_the_training_context(chat_tokenizer, spm_tokenizer) -> None:
    for tok in (chat_tokenizer, spm_tokenizer):
        (example,) = render_examples([SFTRecord("a", messages=CHAT)], tok, start_ids=(tok.eos_id,))
        first_reply = next(i for i, label in enumerate(example.labels) if label != IGNORE)
        assert chat_prompt_ids(CHAT[:2], tok, start_ids=(tok.eos_id,)) == example.input_ids[:first_reply]


def test_template_problems_are_data_errors(hf_tokenizer: HFTokenizer, monkeypatch) -> None:
    refusing = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    monkeypatch.setattr(hf_tokenizer.hf, "chat_template", refusing)
    with pytest.raises(
        DataError, match=r"^row 3: the tokenizer's chat template refused the conversation \(.*no system role"
    ):
        render_examples([SFTRecord("row 3", messages=CHAT)], hf_tokenizer)
    counting = (
        "{{ messages | length }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    monkeypatch.setattr(hf_tokenizer.hf, "chat_template", counting)
    with pytest.raises(DataError, match=r"renders the turns before messages\[2\] differently"):
        render_examples([SFTRecord("row 4", messages=CHAT)], hf_tokenizer)


# ---------------------------------------------------------------------------------------------- packing
def random_examples(tokenizer, n: int, seed: int = 0) -> list[RenderedExample]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        reply = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
        if i % 2:
            records.append(SFTRecord(f"line {i}", prompt=prompt + "\n", completion=reply))
        else:
            records.append(
                SFTRecord(
                    f"line {i}",
                    messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
                )
            )
    return render_examples(records, tokenizer, start_ids=(tokenizer.eos_id,))


def test_packing_never_lets_a_label_cross_an_example_boundary(tokenizer) -> None:
    examples = random_examples(tokenizer, 40)
    blocks = pack_examples(examples, block_size=96, pad_id=tokenizer.pad_id)
    assert blocks.stats.n_truncated == blocks.stats.n_dropped == 0 and len(blocks) == blocks.stats.n_blocks
    found = []
    for i in range(len(blocks)):
        block = blocks[i]
        ids, labels, docs, positions = (
            block[k] for k in ("input_ids", "labels", "document_ids", "position_ids")
        )
        assert ids.shape == labels.shape == docs.shape == positions.shape == (96,)
        for t in torch.nonzero(labels != IGNORE).flatten().tolist():
            assert docs[t] >= 0 and docs[t + 1] == docs[t]  # the target is in the same example
            assert labels[t] == ids[t + 1] and positions[t + 1] == positions[t] + 1
        for d in range(int(docs.max()) + 1):
            where = torch.nonzero(docs == d).flatten()
            assert torch.equal(positions[where], torch.arange(len(where)))  # positions restart per example
            assert labels[where[-1]] == IGNORE  # an example's last token predicts nothing
            found.append((ids[where].tolist(), labels[where].tolist()))
        assert (ids[docs < 0] == tokenizer.pad_id).all() and (labels[docs < 0] == IGNORE).all()
    # every example is packed once, whole, with its own labels shifted by one
    expected = sorted((e.input_ids, e.labels[1:] + [IGNORE]) for e in examples)
    assert sorted(found) == expected
    assert blocks.stats.n_learned == sum(sum(label != IGNORE for label in e.labels[1:]) for e in examples)
    assert blocks.stats.n_tokens == sum(len(e.input_ids) for e in examples)
    assert 0.5 < blocks.stats.fill <= 1.0


def test_the_loss_sees_only_completion_targets(spm_tokenizer) -> None:
    blocks = pack_examples(random_examples(spm_tokenizer, 12), block_size=64, pad_id=spm_tokenizer.pad_id)
    block = blocks[0]
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, spm_tokenizer.vocab_size, generator=generator)  # (T, V)
    loss = F.cross_entropy(logits, block["labels"], ignore_index=IGNORE)
    not_learned = block["labels"] == IGNORE
    changed = logits.clone()
    changed[not_learned] = torch.randn(int(not_learned.sum()), spm_tokenizer.vocab_size, generator=generator)
    assert torch.equal(F.cross_entropy(changed, block["labels"], ignore_index=IGNORE), loss)
    changed[~not_learned] += torch.randn(
        int((~not_learned).sum()), spm_tokenizer.vocab_size, generator=generator
    )
    assert not torch.equal(F.cross_entropy(changed, block["labels"], ignore_index=IGNORE), loss)


def test_block_causal_mask_isolates_examples() -> None:
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, -1, -1]])  # (B=1, T=10)
    mask = document_causal_mask(document_ids)  # (1, 1, T, T)
    assert mask.shape == (1, 1, 10, 10) and mask[0, 0].diagonal().all()
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 4, generator=generator) for _ in range(3))  # (B, heads, T, head size)
    packed = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for start, stop in ((0, 3), (3, 5), (5, 8)):  # each example attends as if it were alone
        alone = F.scaled_dot_product_attention(
            q[..., start:stop, :], k[..., start:stop, :], v[..., start:stop, :], is_causal=True
        )
        torch.testing.assert_close(packed[..., start:stop, :], alone)


def test_overlong_examples(spm_tokenizer) -> None:
    tok = spm_tokenizer
    short = render_examples([SFTRecord("line 1", prompt="Who?", completion=" The king.")], tok)[0]
    long_reply = render_examples([SFTRecord("line 2", prompt="Who?", completion=" the king" * 20)], tok)[0]
    long_prompt = render_examples([SFTRecord("line 3", prompt="who " * 40, completion=" The king.")], tok)[0]
    blocks = pack_examples([short, long_reply, long_prompt], block_size=24, pad_id=tok.pad_id)
    stats = blocks.stats
    assert (stats.n_truncated, stats.n_dropped, stats.dropped) == (2, 1, ["line 3"])
    truncated = [blocks[i] for i in range(len(blocks)) if blocks[i]["document_ids"].eq(0).all()]
    assert len(truncated) == 1  # the long reply fills a block with its first 24 tokens
    assert truncated[0]["input_ids"].tolist() == long_reply.input_ids[:24]
    with pytest.raises(DataError, match=r"^line 2: the example has \d+ tokens, more than data.block_size=24"):
        pack_examples([short, long_reply], block_size=24, pad_id=tok.pad_id, overlong="error")
    with pytest.raises(DataError, match="no example has a completion token within data.block_size=24"):
        pack_examples([long_prompt], block_size=24, pad_id=tok.pad_id)
    with pytest.raises(ConfigError, match="data.block_size=1"):
        pack_examples([short], block_size=1, pad_id=tok.pad_id)
    with pytest.raises(ConfigError, match="data.overlong='drop'"):
        pack_examples([short], block_size=24, pad_id=tok.pad_id, overlong="drop")


def test_best_fit_decreasing() -> None:
    assert best_fit_blocks([5, 3, 7, 2, 3], block_size=10) == [[2, 1], [0, 4, 3]]
    lengths = [random.Random(i).randint(1, 50) for i in range(200)]
    blocks = best_fit_blocks(lengths, block_size=64)
    assert sorted(i for block in blocks for i in block) == list(range(200))
    assert all(sum(lengths[i] for i in block) <= 64 for block in blocks)
    assert len(blocks) <= -(-sum(lengths) // 64) * 11 // 9 + 1  # first/best fit decreasing: <= 11/9 OPT + 1
