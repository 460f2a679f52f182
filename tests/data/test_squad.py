"""Extractive QA data: SQuAD readers and their errors, windowed features and labels, answers from logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmexp.data.squad import (
    NULL_POSITION,
    Answer,
    QACollator,
    QAExample,
    QAFeatureDataset,
    build_features,
    predict_answers,
    read_squad,
)
from lmexp.errors import ConfigError, DataError
from lmexp.tasks.squad_metrics import squad_scores
from tests.data.conftest import special_ids

CONTEXT = (
    "The old king built the castle in 1850. The  queen lives in Paris,\tthe capital of France. "
    "A young horse runs by the river. The red bird sings on the mountain. Who wrote the book? "
    "The old queen wrote a poem in 1901 and the king read it in the garden of the castle."
)


def answer(text: str, context: str = CONTEXT, occurrence: int = 0) -> Answer:
    start = -1
    for _ in range(occurrence + 1):
        start = context.index(text, start + 1)
    return Answer(text, start)


EXAMPLES = [
    QAExample("builder", "Who built the castle?", CONTEXT, [answer("The old king")]),
    QAExample("capital", "What is the capital of France?", CONTEXT, [answer("Paris")]),
    QAExample("poem", "When did the queen write a poem?", CONTEXT, [answer("1901"), answer("in 1901")]),
    QAExample("garden", "Where did the king read it?", CONTEXT, [answer("in the garden of the castle")]),
    QAExample("none", "Who lives in London?", CONTEXT, []),
]


@pytest.fixture(params=["spm", "hf"])
def tokenizer(request: pytest.FixtureRequest):
    return request.getfixturevalue(f"{request.param}_tokenizer")


def features_of(tokenizer, examples=EXAMPLES, max_len=40, stride=8, max_question_len=12):
    cls_id, sep_id = special_ids(tokenizer)
    return build_features(examples, tokenizer, cls_id, sep_id, max_len, stride, max_question_len)


# ---------------------------------------------------------------------------------------------- readers
def write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def squad_json(qas: list[dict], context: str = "Paris is the capital of France.") -> dict:
    return {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}


def test_read_squad_json_v1_and_v2(tmp_path: Path) -> None:
    qas = [
        {"id": "a", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}] * 2},
        {"id": "b", "question": "Of what?", "answers": [{"text": "France", "answer_start": 24}]},
        {"id": "c", "question": "London?", "answers": [], "is_impossible": True, "plausible_answers": []},
    ]
    examples = read_squad(write_json(tmp_path / "train.json", squad_json(qas)))
    assert [e.id for e in examples] == ["a", "b", "c"]
    assert examples[0].answers == [Answer("Paris", 0)] * 2 and examples[0].gold_texts == ["Paris", "Paris"]
    assert examples[1].answers[0].end == 30 and not examples[1].is_impossible
    assert examples[2].is_impossible and examples[2].gold_texts == []
    assert examples[0].context == "Paris is the capital of France."


def test_read_squad_jsonl_huggingface_layout(tmp_path: Path) -> None:
    rows = [
        {
            "id": "a",
            "context": "Paris is nice.",
            "question": "What?",
            "answers": {"text": ["Paris"], "answer_start": [0]},
        },
        {
            "id": 7,
            "context": "Nothing here.",
            "question": "Why?",
            "answers": {"text": [], "answer_start": []},
        },
    ]
    path = tmp_path / "val.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    examples = read_squad(path, "data.val_path")
    assert [(e.id, e.gold_texts) for e in examples] == [("a", ["Paris"]), ("7", [])]
    assert examples[1].where == f"data.val_path: {path} line 2"


JSONL_ROW = {
    "id": "q",
    "context": "Paris is nice.",
    "question": "What?",
    "answers": {"text": ["Paris"], "answer_start": [0]},
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"answers": {"text": ["Paris"], "answer_start": [3]}},
            "answer 'Paris' does not match the context at answer_start 3: 'is is'",
        ),
        (
            {"answers": {"text": ["nice."], "answer_start": [12]}},
            "answer 'nice.' at answer_start 12 ends at character 17, past the end of the context "
            "(14 characters)",
        ),
        ({"question": None}, "field 'question' is NoneType; expected a string"),
        ({"answers": {"text": ["Paris"]}}, "has no field 'answer_start'"),
        ({"answers": {"text": ["Paris", "is"], "answer_start": [0]}}, "2 texts but 1 answer_start values"),
        (
            {"answers": {"text": ["Paris"], "answer_start": ["0"]}},
            "answer_start '0' of 'Paris': expected a character offset >= 0",
        ),
        ({"answers": {"text": [""], "answer_start": [0]}}, "answer text '' is empty"),
        ({"is_impossible": True}, "is_impossible is true but it has 1 answers; expected none"),
        ({"context": "   "}, "the context is empty"),
        ({"id": None}, "field 'id' is NoneType; expected a string"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, change: dict, message: str) -> None:
    path = tmp_path / "train.jsonl"
    rows = [{**JSONL_ROW, "id": "first"}, {**JSONL_ROW, **change}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_squad(path)
    text = str(err.value)
    assert text.startswith(f"data.train_path: {path} line 2: ") and "\n" not in text
    assert message in text


def test_json_errors_name_the_question(tmp_path: Path) -> None:
    qas = [
        {"id": "a", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}]},
        {"id": "b", "question": "Of what?", "answers": [{"text": "Franc", "answer_start": 23}]},
    ]
    path = write_json(tmp_path / "dev.json", squad_json(qas))
    with pytest.raises(
        DataError, match=r"dev.json data\[0\].paragraphs\[0\].qas\[1\]: answer 'Franc' does not "
    ):
        read_squad(path, "data.val_path")
    del qas[1]["question"]
    with pytest.raises(DataError, match=r"qas\[1\]: has no field 'question'"):
        read_squad(write_json(path, squad_json(qas)))
    with pytest.raises(DataError, match=r"expected a SQuAD JSON object"):
        read_squad(write_json(path, [1, 2]))
    with pytest.raises(DataError, match=r"data\[0\]: has no field 'paragraphs'"):
        read_squad(write_json(path, {"data": [{"title": "x"}]}))


def test_duplicate_ids_and_other_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(JSONL_ROW) + "\n\n" + json.dumps(JSONL_ROW) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 3: id 'q' is already used at line 1$"):
        read_squad(path)
    path.write_text('{"id": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1: malformed JSON"):
        read_squad(path)
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"has no questions"):
        read_squad(path)
    with pytest.raises(DataError, match=r"suffix '.csv'; expected .json \(SQuAD\) or .jsonl"):
        read_squad(tmp_path / "train.csv")
    with pytest.raises(DataError, match=r"does not exist"):
        read_squad(tmp_path / "missing.json")


# --------------------------------------------------------------------------------------------- features
def test_layout_and_segments(tokenizer) -> None:
    cls_id, sep_id = special_ids(tokenizer)
    features = features_of(tokenizer)
    question_ids = tokenizer.encode([EXAMPLES[0].question])[0][:12]
    first = features[0]
    n_prefix = len(question_ids) + 2
    assert (
        first.input_ids[:n_prefix].tolist() == [cls_id, *question_ids, sep_id]
        and first.input_ids[-1] == sep_id
    )
    assert first.token_type_ids.tolist() == [0] * n_prefix + [1] * (len(first.input_ids) - n_prefix)
    assert (first.offsets[:n_prefix] == -1).all() and (first.offsets[-1] == -1).all()
    assert first.context_positions.tolist() == list(range(n_prefix, len(first.input_ids) - 1))
    assert (first.offsets[n_prefix:-1] >= 0).all()
    assert all(len(f.input_ids) <= 40 for f in features)
    assert {f.example_id for f in features} == {e.id for e in EXAMPLES}
    assert [f.example_index for f in features] == sorted(f.example_index for f in features)


def test_windows_overlap_by_stride_and_cover_the_context(tokenizer) -> None:
    features = [f for f in features_of(tokenizer, stride=8) if f.example_id == "builder"]
    assert len(features) > 2  # the context is several windows long
    windows = [f.offsets[f.context_positions].tolist() for f in features]
    for previous, following in zip(windows, windows[1:], strict=False):
        assert previous[-8:] == following[:8]
    ((all_ids, all_spans),) = tokenizer.encode_with_offsets([CONTEXT])
    covered = windows[0] + [span for window in windows[1:] for span in window[8:]]
    assert len(covered) == len(all_ids)
    assert covered[-1][1] == len(CONTEXT.rstrip())


def test_question_is_cut_to_max_question_len(tokenizer) -> None:
    long_question = QAExample("long", "Who built " * 30 + "the castle?", CONTEXT, [answer("The old king")])
    (feature, *_) = features_of(tokenizer, [long_question], max_len=40, stride=4, max_question_len=6)
    assert (feature.token_type_ids == 0).sum() == 6 + 2


@pytest.mark.parametrize("stride", [8, 16])
def test_labels_point_at_the_answer_or_the_null_position(tokenizer, stride: int) -> None:
    for feature in features_of(tokenizer, stride=stride):
        example = next(e for e in EXAMPLES if e.id == feature.example_id)
        if feature.start_position == NULL_POSITION:
            assert feature.end_position == NULL_POSITION
            gold = example.answers[0] if example.answers else None
            context_spans = [s for s in feature.offsets.tolist() if s[1] > s[0] >= 0]
            inside = (
                gold is not None and context_spans[0][0] <= gold.start and gold.end <= context_spans[-1][1]
            )
            assert not inside  # a window that holds the whole answer is never labelled null
            continue
        first, last = feature.offsets[feature.start_position], feature.offsets[feature.end_position]
        assert CONTEXT[first[0] : last[1]] == example.answers[0].text
    labelled = {
        f.example_id for f in features_of(tokenizer, stride=stride) if f.start_position != NULL_POSITION
    }
    assert labelled == {"builder", "capital", "poem", "garden"}  # every answerable question somewhere


def test_window_settings_are_checked(tokenizer) -> None:
    with pytest.raises(
        ConfigError, match=r"data.max_len=20 leaves 5 context tokens .* expected more than data.stride=8"
    ):
        features_of(tokenizer, max_len=20, stride=8, max_question_len=12)
    with pytest.raises(ConfigError, match=r"data.stride=-1: expected an integer >= 0"):
        features_of(tokenizer, stride=-1)


def test_collator_pads(spm_tokenizer) -> None:
    features = features_of(spm_tokenizer)
    dataset = QAFeatureDataset(features)
    batch = QACollator(pad_id=spm_tokenizer.pad_id)([dataset[0], dataset[len(dataset) - 1]])
    n_last = len(features[-1].input_ids)
    assert batch["input_ids"].shape == batch["token_type_ids"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][1].sum() == n_last and batch["input_ids"][1, n_last:].eq(0).all()
    assert batch["index"].tolist() == [0, len(dataset) - 1]
    assert batch["start_positions"].tolist() == [features[0].start_position, features[-1].start_position]


# ---------------------------------------------------------------------------------------------- answers
def logits_from_labels(features, null_logit: float = -5.0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Logits that put the answer where the labels are: high at the labelled start/end, low elsewhere."""
    starts, ends = [], []
    for feature in features:
        start, end = np.full(len(feature.input_ids), -10.0), np.full(len(feature.input_ids), -10.0)
        start[NULL_POSITION] = end[NULL_POSITION] = null_logit
        if feature.start_position != NULL_POSITION:
            start[feature.start_position], end[feature.end_position] = 10.0, 10.0
        starts.append(start)
        ends.append(end)
    return starts, ends


def test_answers_from_label_logits_score_100_percent(tokenizer) -> None:
    features = features_of(tokenizer)
    starts, ends = logits_from_labels(features, null_logit=5.0)
    predictions = predict_answers(EXAMPLES, features, starts, ends, null_threshold=0.0)
    assert {i: p.text for i, p in predictions.items()} == {
        "builder": "The old king",
        "capital": "Paris",
        "poem": "1901",
        "garden": "in the garden of the castle",
        "none": "",  # null score 10 beats its best span (-20) and no window has a real answer
    }
    scores = squad_scores({i: p.text for i, p in predictions.items()}, {e.id: e.gold_texts for e in EXAMPLES})
    assert scores == {"exact_match": 1.0, "f1": 1.0}


def test_v1_always_answers_and_the_threshold_decides_v2(spm_tokenizer) -> None:
    features = features_of(spm_tokenizer)
    starts, ends = logits_from_labels(features, null_logit=5.0)
    v1 = predict_answers(EXAMPLES, features, starts, ends)  # null_threshold=None: SQuAD v1.1
    assert v1["none"].text != "" and v1["none"].null_score == 10.0
    assert v1["capital"].text == "Paris" and v1["capital"].score == 20.0
    # v2: no answer when the null score (10) beats the best span (20) by MORE than the threshold
    for threshold, text in ((0.0, "Paris"), (-9.0, "Paris"), (-10.0, "Paris"), (-10.5, ""), (-11.0, "")):
        assert (
            predict_answers(EXAMPLES, features, starts, ends, null_threshold=threshold)["capital"].text
            == text
        )


def test_span_rules(spm_tokenizer) -> None:
    example = QAExample("x", "Who?", "A young horse runs by the river.", [])
    (feature,) = features_of(spm_tokenizer, [example], max_len=40, stride=4, max_question_len=4)
    context = [t for t, (a, b) in enumerate(feature.offsets.tolist()) if b > a >= 0]
    start, end = np.zeros(len(feature.input_ids)), np.zeros(len(feature.input_ids))
    start[context[3]], end[context[1]] = 9.0, 8.0  # the best end lies before the best start: invalid
    end[context[4]] = 6.0  # so the best valid span is context tokens 3..4 (9 + 6)
    start[1] = end[1] = 20.0  # a question token is never part of an answer
    (prediction,) = predict_answers([example], [feature], [start], [end]).values()
    span_text = example.context[feature.offsets[context[3]][0] : feature.offsets[context[4]][1]]
    assert prediction.text == span_text and prediction.score == 15.0
    single = predict_answers([example], [feature], [start], [end], max_answer_len=1)["x"]
    assert single.score == 9.0 and single.text in {
        example.context[slice(*feature.offsets[t])] for t in context
    }
    assert [c.score for c in prediction.n_best] == sorted((c.score for c in prediction.n_best), reverse=True)
    assert len({(c.start, c.end) for c in prediction.n_best}) == len(prediction.n_best) == 20


def test_windows_are_merged_best_score_wins(tokenizer) -> None:
    features = [f for f in features_of(tokenizer, stride=16) if f.example_id == "garden"]
    holding = [f for f in features if f.start_position != NULL_POSITION]
    starts, ends = logits_from_labels(features)
    assert len(holding) >= 1
    weaker = features.index(holding[0])
    starts[weaker][holding[0].start_position] = 3.0  # a lower score for the same answer in one window
    prediction = predict_answers(EXAMPLES, features, starts, ends)["garden"]
    assert prediction.text == "in the garden of the castle"
    assert prediction.score == (20.0 if len(holding) > 1 else 13.0)
    assert len({(c.start, c.end) for c in prediction.n_best}) == len(prediction.n_best)


@pytest.mark.parametrize(
    ("context", "gold"),
    [
        ("Born in  Paris,\tthe  old   king wrote.", "the  old   king"),  # irregular whitespace is kept
        ("The queen lives in Zürich 😀 by the river.", "Zürich 😀"),  # characters in byte pieces
    ],
)
def test_answer_text_is_the_original_substring(tokenizer, context: str, gold: str) -> None:
    example = QAExample("w", "Who?", context, [Answer(gold, context.index(gold))])
    (feature,) = features_of(tokenizer, [example], max_len=60, stride=4, max_question_len=4)
    starts, ends = logits_from_labels([feature])
    assert feature.start_position != NULL_POSITION
    assert predict_answers([example], [feature], starts, ends)["w"].text == gold


def test_logits_as_padded_tensors(spm_tokenizer) -> None:
    features = features_of(spm_tokenizer)
    starts, ends = logits_from_labels(features)
    width = max(len(f.input_ids) for f in features)

    def padded(rows: list[np.ndarray]) -> torch.Tensor:  # (N, T); padding must never be chosen
        return torch.stack(
            [torch.nn.functional.pad(torch.tensor(r), (0, width - len(r)), value=50.0) for r in rows]
        )

    start_tensor, end_tensor = padded(starts).to(torch.bfloat16), padded(ends)
    predictions = predict_answers(EXAMPLES, features, start_tensor, end_tensor)
    assert predictions["capital"].text == "Paris"
    with pytest.raises(ValueError, match="features but"):
        predict_answers(EXAMPLES, features, start_tensor[:2], end_tensor)
