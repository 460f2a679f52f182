"""The toy fine-tuning data sets of the README read back with the real readers (offsets checked there)."""

from __future__ import annotations

from lmexp.data.labelled import read_records
from lmexp.data.sft import read_sft
from lmexp.data.squad import read_squad
from lmexp.data.toy_tasks import write_toy_tasks


def test_toy_tasks_are_valid_squad_and_sft_files(tmp_path):
    paths = write_toy_tasks(tmp_path, sizes={"train": 6, "val": 3})
    names = ("squad", "summarize", "translate", "classify")
    assert sorted(p.name for p in paths) == sorted(
        [f"{name}-{split}.jsonl" for name in names for split in ("train", "val")]
        + [f"ner-{split}.conll" for split in ("train", "val")]
    )
    questions = read_squad(tmp_path / "squad-train.jsonl", "data.train_path")  # checks every answer_start
    assert len(questions) == 6 and all(q.gold_texts for q in questions)
    summaries = read_sft(tmp_path / "summarize-val.jsonl")
    assert all(r.prompt.startswith("Summarize: ") and r.completion.endswith(".") for r in summaries)
    chats = read_sft(tmp_path / "translate-train.jsonl")
    assert [m["role"] for m in chats[0].messages] == ["system", "user", "assistant"]
    assert (
        write_toy_tasks(tmp_path / "again", sizes={"train": 6, "val": 3})[0].read_text()
        == paths[0].read_text()
    )


def test_classify_and_ner_sets_read_back_and_their_labels_follow_the_topic_nouns(tmp_path):
    from lmexp.data.corpus import GrammarConfig, build_grammar

    write_toy_tasks(tmp_path, sizes={"train": 40, "val": 5})
    fields = {"text": "text", "label": "label", "tokens": "tokens", "tags": "tags"}
    texts = read_records(tmp_path / "classify-train.jsonl", "data.train_path", "classify", "jsonl", fields)
    assert {r.label for r in texts} == {"topic0", "topic1", "topic2", "topic3"}
    topics = build_grammar(GrammarConfig()).topic_nouns
    for record in texts:  # both nouns of the sentence are of the labelled topic
        words = set(record.text.rstrip(".").split())
        assert len(words & set(topics[int(record.label.removeprefix("topic"))])) >= 1
        assert not any(words & set(nouns) for t, nouns in enumerate(topics) if f"topic{t}" != record.label)
    sentences = read_records(tmp_path / "ner-train.conll", "data.train_path", "ner", "conll", fields)
    assert len(sentences) == 40 and {"B-T0", "B-T1", "O"} <= {t for r in sentences for t in r.tags}
    for record in sentences:
        for word, tag, before in zip(record.tokens, record.tags, ["O", *record.tags], strict=False):
            if tag != "O":
                assert word in topics[int(tag[-1])]
            if tag.startswith("I-"):
                assert before[2:] == tag[2:]  # an I- tag continues an entity of its own topic
