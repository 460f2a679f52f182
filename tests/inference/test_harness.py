"""lmexp.inference.harness: the lm-eval adapter scores like a forward pass by hand (lmexp and HF models)."""

from __future__ import annotations

import math
import random
import re

import pytest
import torch

from lmexp.errors import ConfigError
from lmexp.inference.agreement import agreement_examples, write_agreement_task
from lmexp.inference.evaluate import _score_stream
from lmexp.inference.harness import HarnessLM, SentencePieceText, flat_metrics, run_harness, task_manager
from lmexp.models.lstm import LSTMConfig
from tests.inference.helpers import hand_greedy, hand_loglikelihood, requests, write_task


def sp_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode([text])[0]


def lmexp_lm(gpt, tokenizer, **kwargs) -> HarnessLM:
    """The adapter over the lmexp GPT, with settings a test may change (``max_length``, ``batch_size``)."""
    kwargs = {"max_length": gpt.config.max_seq_len, "batch_size": 2, **kwargs}
    base = HarnessLM.from_lmexp(gpt, tokenizer)
    return HarnessLM(
        gpt, base.text_tokenizer, generate=base.generate_fn, vocab_size=base.vocab_size, **kwargs
    )


# ------------------------------------------------------------------------------------- request types
def test_loglikelihood_equals_a_forward_pass_by_hand(gpt, sp_tokenizer):
    pairs = [
        ("The dog", " runs"),
        ("Some words of a longer context that goes on", " and on here"),
        ("", "The dogs run."),  # empty context: conditioned on the document start alone
        ("The cats that", " see the"),
        ("A", " b"),
    ]
    lm = HarnessLM.from_lmexp(gpt, sp_tokenizer, batch_size=2)  # 5 requests of different lengths: padding
    results = lm.loglikelihood(requests("loglikelihood", *pairs))
    eos = sp_tokenizer.eos_id
    for (context, continuation), (log_likelihood, greedy) in zip(pairs, results, strict=True):
        context_ids = [eos, *sp_ids(sp_tokenizer, context)] if context else [eos]
        whole = [eos, *sp_ids(sp_tokenizer, context + continuation)]
        expected, expected_greedy = hand_loglikelihood(gpt, context_ids, whole)
        assert log_likelihood == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy
        assert log_likelihood < 0


def test_greedy_flag_is_true_for_the_models_own_continuation(gpt, sp_tokenizer):
    lm = HarnessLM.from_lmexp(gpt, sp_tokenizer)
    context = [sp_tokenizer.eos_id, *sp_ids(sp_tokenizer, "The dog")]
    own = hand_greedy(gpt, context, 4, sp_tokenizer.vocab_size, eos_id=-1)
    other = [(own[0] + 1) % sp_tokenizer.vocab_size, *own[1:]]
    (_, greedy), (_, not_greedy) = lm._loglikelihood_tokens([(None, context, own), (None, context, other)])
    assert greedy and not not_greedy


def test_a_long_context_is_cut_from_the_left(gpt, sp_tokenizer, documents):
    lm = lmexp_lm(gpt, sp_tokenizer, max_length=16)
    context, continuation = documents[0], " runs"
    [(log_likelihood, _)] = lm.loglikelihood(requests("loglikelihood", (context, continuation)))
    full_context = [sp_tokenizer.eos_id, *sp_ids(sp_tokenizer, context)]
    full = [sp_tokenizer.eos_id, *sp_ids(sp_tokenizer, context + continuation)]
    assert len(full_context) > 16
    window = full[-17:]  # 16 inputs; the last token is only a target
    n_continuation = len(full) - len(full_context)
    expected, _ = hand_loglikelihood(gpt, window[: len(window) - n_continuation], window)
    assert log_likelihood == pytest.approx(expected, abs=1e-4)


def test_rolling_loglikelihood_is_lmexp_evals_per_document_score(gpt, sp_tokenizer, documents):
    # lmexp.eval scores "[eos] doc" in disjoint windows of block_size; the harness's rolling windows are
    # the same when the document is a whole number of windows long (lmexp.eval also scores a closing eos).
    ids, window = next(
        (ids, w) for ids in sp_tokenizer.encode(documents) for w in range(12, 33) if len(ids) % w == 0
    )
    assert len(ids) >= 2 * window
    lm = lmexp_lm(gpt, sp_tokenizer, max_length=window, batch_size=3)
    [rolling] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (sp_tokenizer.decode(ids),)))
    nll, _ = _score_stream(gpt, torch.tensor([sp_tokenizer.eos_id, *ids]), window, sp_tokenizer.vocab_size)
    assert rolling == pytest.approx(-nll, rel=1e-5)


def test_rolling_windows_of_many_documents_are_batched_without_changing_scores(gpt, sp_tokenizer, documents):
    texts = [documents[1], "The dog runs.", documents[2][:200]]
    batched = lmexp_lm(gpt, sp_tokenizer, max_length=24, batch_size=5)
    one_by_one = lmexp_lm(gpt, sp_tokenizer, max_length=24, batch_size=1)
    scores = batched.loglikelihood_rolling(requests("loglikelihood_rolling", *[(t,) for t in texts]))
    assert scores == pytest.approx(
        [one_by_one.loglikelihood_rolling(requests("loglikelihood_rolling", (t,)))[0] for t in texts],
        abs=1e-4,
    )
    short = texts[1]  # one window: the whole text after the document start
    ids = [sp_tokenizer.eos_id, *sp_ids(sp_tokenizer, short)]
    assert scores[1] == pytest.approx(hand_loglikelihood(gpt, ids[:1], ids)[0], abs=1e-4)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(gpt, sp_tokenizer):
    lm = HarnessLM.from_lmexp(gpt, sp_tokenizer)
    eos, vocab = sp_tokenizer.eos_id, sp_tokenizer.vocab_size
    contexts = ["The dog", "Some cats that", "A"]
    full = [
        sp_tokenizer.decode(hand_greedy(gpt, [eos, *sp_ids(sp_tokenizer, c)], 12, vocab, eos))
        for c in contexts
    ]
    stop = full[0][len(full[0]) // 2 :][:2]  # a string the first generation contains
    assert stop.strip()
    settings = {"until": [stop], "max_gen_toks": 12, "do_sample": False}
    texts = lm.generate_until(requests("generate_until", *[(c, settings) for c in contexts]))
    assert texts == [text.split(stop)[0] for text in full]
    assert len(texts[0]) < len(full[0])


def test_sampled_generation_follows_the_seed(gpt, sp_tokenizer):
    lm = HarnessLM.from_lmexp(gpt, sp_tokenizer)
    settings = {"until": [], "max_gen_toks": 10, "do_sample": True, "temperature": 1.0, "top_k": 50}

    def sample(seed: int) -> str:
        torch.manual_seed(seed)
        return lm.generate_until(requests("generate_until", ("The dog", settings)))[0]

    assert sample(0) == sample(0) != sample(1)


def test_an_lstm_scores_and_generates_through_the_same_adapter(sp_tokenizer):
    torch.manual_seed(0)
    lstm = LSTMConfig(n_layer=1, n_embd=16, hidden_size=24, vocab_size=sp_tokenizer.vocab_size).build().eval()
    with pytest.raises(ConfigError, match="LSTMLM has no max_seq_len: pass max_length"):
        HarnessLM.from_lmexp(lstm, sp_tokenizer)
    lm = HarnessLM.from_lmexp(lstm, sp_tokenizer, max_length=32)
    eos, vocab = sp_tokenizer.eos_id, sp_tokenizer.vocab_size
    [(log_likelihood, _)] = lm.loglikelihood(requests("loglikelihood", ("The dog", " runs")))
    context, whole = [eos, *sp_ids(sp_tokenizer, "The dog")], [eos, *sp_ids(sp_tokenizer, "The dog runs")]
    assert log_likelihood == pytest.approx(hand_loglikelihood(lstm, context, whole)[0], abs=1e-4)
    settings = {"until": [], "max_gen_toks": 8, "do_sample": False}
    [text] = lm.generate_until(requests("generate_until", ("The dog", settings)))
    assert text == sp_tokenizer.decode(hand_greedy(lstm, context, 8, vocab, eos))


# -------------------------------------------------------------------------------------- run_harness
def test_multiple_choice_accuracy_is_the_hand_computed_one(gpt, sp_tokenizer, grammar, tmp_path):
    examples = agreement_examples(grammar, 16, seed=0)
    write_agreement_task(tmp_path, examples, datasets_cache_dir=tmp_path / "datasets")
    lm = HarnessLM.from_lmexp(gpt, sp_tokenizer, batch_size=4)
    states = random.getstate(), torch.get_rng_state()
    metrics = run_harness(lm, ["lmexp_agreement"], include_path=tmp_path, seed=3)
    assert (random.getstate(), torch.get_rng_state().tolist()) == (states[0], states[1].tolist())  # restored

    eos, correct, correct_norm = sp_tokenizer.eos_id, 0, 0
    for example in examples:
        context_ids = [eos, *sp_ids(sp_tokenizer, example["context"])]
        scores = [
            hand_loglikelihood(
                gpt, context_ids, [eos, *sp_ids(sp_tokenizer, f"{example['context']} {choice}")]
            )[0]
            for choice in example["choices"]
        ]
        normalised = [score / len(choice) for score, choice in zip(scores, example["choices"], strict=True)]
        correct += max(range(2), key=scores.__getitem__) == example["label"]
        correct_norm += max(range(2), key=normalised.__getitem__) == example["label"]
    assert metrics["harness/lmexp_agreement/acc"] == pytest.approx(correct / len(examples))
    assert metrics["harness/lmexp_agreement/acc_norm"] == pytest.approx(correct_norm / len(examples))
    p = correct / len(examples)
    stderr = math.sqrt(p * (1 - p) / (len(examples) - 1))  # lm-eval's closed form for a mean
    assert metrics["harness/lmexp_agreement/acc_stderr"] == pytest.approx(stderr)


def test_rolling_and_generative_tasks_in_one_run(gpt, sp_tokenizer, documents, tmp_path):
    eos, vocab = sp_tokenizer.eos_id, sp_tokenizer.vocab_size
    sentences = [doc.split(". ")[0] + "." for doc in documents[:12]]
    sentences = [s for s in sentences if len(sp_ids(sp_tokenizer, s)) < 60][:6]  # one window each
    write_task(
        tmp_path, "lmexp_sentences", [{"text": s} for s in sentences],
        output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="text",
        metric_list=[{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
    )  # fmt: skip
    # Half of the targets are the model's own greedy completion, so exact_match must be 0.5.
    contexts = [" ".join(s.split()[:3]) for s in sentences[:4]]
    greedy = [
        sp_tokenizer.decode(hand_greedy(gpt, [eos, *sp_ids(sp_tokenizer, c)], 8, vocab, eos)).split(".")[0]
        for c in contexts
    ]
    rows = [
        {"context": c, "target": g if i % 2 == 0 else "not this"}
        for i, (c, g) in enumerate(zip(contexts, greedy, strict=True))
    ]
    write_task(
        tmp_path, "lmexp_complete", rows, output_type="generate_until", doc_to_text="context",
        doc_to_target="target", generation_kwargs={"until": ["."], "max_gen_toks": 8, "do_sample": False},
        metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    )  # fmt: skip
    lm = HarnessLM.from_lmexp(gpt, sp_tokenizer, batch_size=4)
    metrics = run_harness(lm, ["lmexp_sentences", "lmexp_complete"], include_path=tmp_path)

    assert metrics["harness/lmexp_complete/exact_match"] == 0.5
    log_likelihood = sum(
        hand_loglikelihood(gpt, [eos], [eos, *sp_ids(sp_tokenizer, s)])[0] for s in sentences
    )
    words = sum(len(re.split(r"\s+", s)) for s in sentences)
    n_bytes = sum(len(s.encode()) for s in sentences)
    assert metrics["harness/lmexp_sentences/word_perplexity"] == pytest.approx(
        math.exp(-log_likelihood / words)
    )
    assert metrics["harness/lmexp_sentences/bits_per_byte"] == pytest.approx(
        -log_likelihood / n_bytes / math.log(2)
    )


def test_a_hugging_face_gpt2_through_the_same_protocol(hf_gpt2, hf_tokenizer, grammar, tmp_path):
    examples = agreement_examples(grammar, 10, seed=1)
    write_agreement_task(tmp_path, examples, datasets_cache_dir=tmp_path / "datasets")
    lm = HarnessLM.from_hf(hf_gpt2, hf_tokenizer, batch_size=3)
    metrics = run_harness(lm, ["lmexp_agreement"], include_path=tmp_path, limit=6, bootstrap_iters=0)
    assert set(metrics) == {"harness/lmexp_agreement/acc", "harness/lmexp_agreement/acc_norm"}

    def ids(text: str) -> list[int]:
        return hf_tokenizer(text, add_special_tokens=False)["input_ids"]

    logits = lambda input_ids: hf_gpt2(input_ids=input_ids).logits  # noqa: E731
    correct = 0
    for example in examples[:6]:  # limit=6: the first six
        scores = [
            hand_loglikelihood(logits, ids(example["context"]), ids(f"{example['context']} {choice}"))[0]
            for choice in example["choices"]
        ]
        correct += max(range(2), key=scores.__getitem__) == example["label"]
    assert metrics["harness/lmexp_agreement/acc"] == pytest.approx(correct / 6)

    # generate_until through the model's own generate() is its greedy decoding, cut at the stop string
    eos = hf_tokenizer.eos_token_id
    settings = {"until": ["."], "max_gen_toks": 10, "do_sample": False}
    [text] = lm.generate_until(requests("generate_until", ("The dog", settings)))
    expected = hf_tokenizer.decode(hand_greedy(logits, ids("The dog"), 10, len(hf_tokenizer), eos))
    assert text == expected.split(".")[0]
    sampled = {"until": [], "max_gen_toks": 10, "do_sample": True, "temperature": 1.0}  # top_k: none

    def sample(seed: int) -> str:
        torch.manual_seed(seed)
        return lm.generate_until(requests("generate_until", ("The dog", sampled)))[0]

    assert sample(0) == sample(0) != sample(1)


# ------------------------------------------------------------------------------------ names and keys
def test_bad_task_lists_and_paths_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"harness.tasks=\[\]: expected a non-empty list"):
        task_manager([], None)
    with pytest.raises(ConfigError, match="harness.tasks='hellaswag': expected a non-empty list"):
        task_manager("hellaswag", None)
    with pytest.raises(ConfigError, match="harness.include_path=.*missing: expected a directory"):
        task_manager(["x"], tmp_path / "missing")


@pytest.mark.slow  # indexes lm-eval's ~15,000 built-in tasks (about 15 s on one core)
def test_unknown_task_names_list_close_names(grammar, tmp_path):
    write_agreement_task(tmp_path, agreement_examples(grammar, 2, seed=0))
    with pytest.raises(ConfigError) as error:
        task_manager(["lmexp_agrement", "hellaswg", "lmexp_agreement"], tmp_path)
    message = str(error.value)
    assert "harness.tasks: 'lmexp_agrement' is not an lm-eval task" in message
    assert "close names: lmexp_agreement" in message
    assert "'hellaswg'" in message and "hellaswag" in message
    assert "\n" not in message
    # a built-in task and a local one together come from one index with both
    assert {"hellaswag", "lmexp_agreement"} <= set(
        task_manager(["hellaswag", "lmexp_agreement"], tmp_path).all_tasks
    )


def test_flat_metrics_keys():
    results = {
        "results": {
            "gsm8k": {
                "alias": "gsm8k",
                "exact_match,strict-match": 0.25,
                "exact_match_stderr,strict-match": "N/A",
            },
            "mytask": {"alias": "mytask", "acc,none": 0.5, "acc_stderr,none": 0.1},
        }
    }
    assert flat_metrics(results) == {
        "harness/gsm8k/exact_match/strict-match": 0.25,
        "harness/mytask/acc": 0.5,
        "harness/mytask/acc_stderr": 0.1,
    }


def test_sentencepiece_text_round_trip(sp_tokenizer):
    text = SentencePieceText(sp_tokenizer)
    assert text.decode(text.encode("The dogs run.")) == "The dogs run."
    assert text.eos_id == sp_tokenizer.eos_id
