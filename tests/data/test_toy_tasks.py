"""The toy fine-tuning data sets of the README read back with the real readers (offsets checked there)."""

from __future__ import annotations

from lmexp.data.sft import read_sft
from lmexp.data.squad import read_squad
from lmexp.data.toy_tasks import write_toy_tasks


def test_toy_tasks_are_valid_squad_and_sft_files(tmp_path):
    paths = write_toy_tasks(tmp_path, sizes={"train": 6, "val": 3})
    assert sorted(p.name for p in paths) == sorted(
        f"{name}-{split}.jsonl" for name in ("squad", "summarize", "translate") for split in ("train", "val")
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
