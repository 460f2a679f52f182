"""The built-in grammar corpus: exact entropy against brute force, unambiguity, sampling, config errors."""

from __future__ import annotations

import math
import random
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence

import pytest

from lmexp.data.corpus import PCFG, Grammar, GrammarConfig, build_grammar, generate_documents
from lmexp.errors import ConfigError

# A partial derivation left unexpanded by the enumeration: (probability, words so far, pending items).
Pending = tuple[float, tuple[str, ...], tuple[str, ...]]


def enumerate_derivations(
    pcfg: PCFG, min_prob: float
) -> tuple[list[tuple[float, tuple[str, ...]]], list[Pending]]:
    """All leftmost derivations with probability >= ``min_prob``, plus the partial ones cut off.

    Returns (complete derivations as (probability, words), pruned partial derivations).
    """
    complete: list[tuple[float, tuple[str, ...]]] = []
    pruned: list[Pending] = []
    stack: list[Pending] = [(1.0, (), (pcfg.start,))]
    while stack:
        p, words, pending = stack.pop()
        n_terminals = 0
        while n_terminals < len(pending) and pending[n_terminals] not in pcfg.rules:
            n_terminals += 1
        words, pending = words + pending[:n_terminals], pending[n_terminals:]
        if not pending:
            complete.append((p, words))
            continue
        for q, rhs in pcfg.rules[pending[0]]:
            state = (p * q, words, rhs + pending[1:])
            (stack if p * q >= min_prob else pruned).append(state)
    return complete, pruned


def string_entropy(
    complete: list[tuple[float, tuple[str, ...]]], render: Callable[[Sequence[str]], str]
) -> tuple[float, int]:
    """Entropy (bits) and distinct-string count of the enumerated mass, grouping derivations by text."""
    by_text: dict[str, float] = defaultdict(float)
    for p, words in complete:
        by_text[render(words)] += p
    return -sum(p * math.log2(p) for p in by_text.values()), len(by_text)


def tail_entropy(pcfg: PCFG, pruned: list[Pending]) -> float:
    """Exact entropy carried by the pruned partial derivations (assuming their completions are distinct)."""
    h = pcfg.symbol_entropy_bits()
    return sum(p * (-math.log2(p) + sum(h.get(item, 0.0) for item in pending)) for p, _, pending in pruned)


def tail_words(pcfg: PCFG, pruned: list[Pending], is_word: Callable[[str], bool] = lambda w: True) -> float:
    """Expected words carried by the pruned partial derivations."""
    e = pcfg.symbol_expected_words()
    total = 0.0
    for p, words, pending in pruned:
        rest = sum(e[item] if item in e else float(is_word(item)) for item in pending)
        total += p * (sum(map(is_word, words)) + rest)
    return total


def joined(words: Sequence[str]) -> str:
    return " ".join(words)


# --------------------------------------------------------------------------- generic PCFG


def test_finite_grammar_entropy_is_exact() -> None:
    pcfg = PCFG(
        {
            "S": [(0.7, ("A", "B")), (0.3, ("x",))],
            "A": [(0.5, ("a",)), (0.5, ("b",))],
            "B": [(0.2, ("c",)), (0.8, ("d", "C"))],
            "C": [(0.1, ("e",)), (0.9, ("f", "g"))],
        },
        start="S",
    )
    complete, pruned = enumerate_derivations(pcfg, min_prob=0.0)
    assert not pruned and math.isclose(sum(p for p, _ in complete), 1.0)
    entropy, n_strings = string_entropy(complete, joined)
    assert n_strings == len(complete)
    assert pcfg.entropy_bits() == pytest.approx(entropy, abs=1e-12)
    assert pcfg.expected_words() == pytest.approx(sum(p * len(w) for p, w in complete), abs=1e-12)
    assert pcfg.symbol_entropy_bits()["S"] == pytest.approx(entropy, abs=1e-12)


@pytest.mark.slow
def test_recursive_grammar_entropy_matches_brute_force() -> None:
    pcfg = PCFG(
        {
            "S": [(0.25, ("a", "S")), (0.2, ("b", "T")), (0.55, ("c",))],
            "T": [(0.7, ("d",)), (0.3, ("e", "S", "f"))],
        },
        start="S",
    )
    complete, pruned = enumerate_derivations(pcfg, min_prob=1e-14)
    missing = 1.0 - sum(p for p, _ in complete)
    assert missing == pytest.approx(sum(p for p, _, _ in pruned), abs=1e-12)
    assert missing < 1e-9
    entropy, n_strings = string_entropy(complete, joined)
    assert n_strings == len(complete)  # unambiguous: no two derivations share a string
    # Each missing derivation has probability < 1e-14 (about 47 bits) and a short expected remainder,
    # so the tail adds well under missing * 100 bits to the entropy; likewise for the length.
    assert 0 <= pcfg.entropy_bits() - entropy < missing * 100 + 1e-12
    words = sum(p * len(w) for p, w in complete)
    assert 0 <= pcfg.expected_words() - words < missing * 100 + 1e-12
    # With the tail accounted for exactly, the match is to rounding error.
    assert pcfg.entropy_bits() == pytest.approx(entropy + tail_entropy(pcfg, pruned), abs=1e-10)
    assert pcfg.expected_words() == pytest.approx(words + tail_words(pcfg, pruned), abs=1e-10)


def test_ambiguous_grammar_has_string_entropy_below_derivation_entropy() -> None:
    # "a x" has two derivations: the brute-force comparison would catch an ambiguous grammar.
    pcfg = PCFG(
        {"S": [(0.5, ("A", "x")), (0.5, ("a", "B"))], "A": [(1.0, ("a",))], "B": [(1.0, ("x",))]}, "S"
    )
    complete, _ = enumerate_derivations(pcfg, min_prob=0.0)
    entropy, _ = string_entropy(complete, joined)
    assert pcfg.entropy_bits() == pytest.approx(1.0) and entropy == pytest.approx(0.0)


def test_supercritical_grammar_is_rejected() -> None:
    pcfg = PCFG({"S": [(0.6, ("S", "S")), (0.4, ("a",))]}, start="S")
    with pytest.raises(ValueError, match="subcritical"):
        pcfg.entropy_bits()
    with pytest.raises(ValueError, match="sum to"):
        PCFG({"S": [(0.6, ("a",)), (0.6, ("b",))]}, start="S")


def test_sampled_logprob_matches_rule_probabilities() -> None:
    pcfg = PCFG({"S": [(0.25, ("a", "S")), (0.75, ("b",))]}, start="S")
    rng = random.Random(1)
    for _ in range(50):
        words, log_prob = pcfg.sample_with_logprob(rng)
        n_a = len(words) - 1
        assert words == ["a"] * n_a + ["b"]
        assert log_prob == pytest.approx(n_a * math.log2(0.25) + math.log2(0.75))


# --------------------------------------------------------------------------- the built-in grammar

MINI = dict(
    n_topics=2,
    nouns_per_topic=2,
    n_verbs=1,
    n_adjectives=1,
    n_determiners=1,  # "the" is then both the singular and the plural determiner
    n_prepositions=1,
    rc_prob=0.05,
    adj_prob=0.05,
    pp_prob=0.2,
    transitive_prob=0.5,
    singular_prob=0.7,
    min_sentences=1,
    max_sentences=2,
)


# Documents multiply sentence counts, so the document-level check uses a still smaller grammar.
DOC_MINI = MINI | dict(nouns_per_topic=1, pp_prob=0.1, rc_prob=0.03, adj_prob=0.03)


@pytest.fixture(scope="module")
def mini() -> Grammar:
    return build_grammar(GrammarConfig(**MINI))


@pytest.fixture(scope="module")
def doc_mini() -> Grammar:
    return build_grammar(GrammarConfig(**DOC_MINI))


@pytest.fixture(scope="module")
def default_grammar() -> Grammar:
    return build_grammar(GrammarConfig())


@pytest.mark.slow
def test_mini_sentences_are_unambiguous(mini: Grammar) -> None:
    # Pool both topics (uniform): the text must reveal the topic as well as the derivation.
    for topic, pcfg in enumerate(mini.topic_pcfgs):
        complete, pruned = enumerate_derivations(pcfg, min_prob=1e-9)
        assert sum(p for p, _, _ in pruned) < 1e-4
        entropy, n_strings = string_entropy(complete, mini.render_sentence)
        assert n_strings == len(complete), f"topic {topic}: two derivations give the same text"
        assert pcfg.entropy_bits() == pytest.approx(entropy + tail_entropy(pcfg, pruned), abs=1e-9)
        words = sum(p * len(mini.render_sentence(w).split()) for p, w in complete)
        assert pcfg.expected_words() == pytest.approx(words + tail_words(pcfg, pruned), abs=1e-9)


def document_pcfg(grammar: Grammar) -> PCFG:
    """The whole document distribution as one PCFG; "." terminals mark sentence ends."""
    c = grammar.config
    rules: dict[str, list] = {}
    lengths = range(c.min_sentences, c.max_sentences + 1)
    p_doc = 1.0 / (c.n_topics * len(lengths))
    rules["Doc"] = [(p_doc, (f"{t}:S", ".") * n) for t in range(c.n_topics) for n in lengths]
    for t, pcfg in enumerate(grammar.topic_pcfgs):
        for lhs, options in pcfg.rules.items():
            rules[f"{t}:{lhs}"] = [
                (p, tuple(f"{t}:{x}" if x in pcfg.rules else x for x in rhs)) for p, rhs in options
            ]
    return PCFG(rules, start="Doc")


def render_document(grammar: Grammar, words: Sequence[str]) -> str:
    """Surface text of a document-PCFG derivation, exactly as the generator writes it."""
    sentences, current = [], []
    for word in words:
        if word == ".":
            sentences.append(grammar.render_sentence(current))
            current = []
        else:
            current.append(word)
    return " ".join(sentences)


@pytest.mark.slow
def test_mini_document_floor_matches_brute_force(doc_mini: Grammar) -> None:
    g = doc_mini
    pcfg = document_pcfg(g)
    # The document PCFG's derivation entropy is the floor formula's numerator by construction.
    assert pcfg.entropy_bits() == pytest.approx(g.entropy_bits_per_document(), abs=1e-9)
    complete, pruned = enumerate_derivations(pcfg, min_prob=1e-9)
    assert sum(p for p, _, _ in pruned) < 1e-3
    entropy, n_strings = string_entropy(complete, lambda w: render_document(g, w))
    assert n_strings == len(complete), "two document derivations give the same text"
    h_doc = entropy + tail_entropy(pcfg, pruned)
    assert g.entropy_bits_per_document() == pytest.approx(h_doc, abs=1e-8)
    words = sum(p * len(render_document(g, w).split()) for p, w in complete)
    words += tail_words(pcfg, pruned, is_word=lambda w: w != ".")  # periods are not words
    assert g.expected_words_per_document() == pytest.approx(words, abs=1e-8)
    assert g.entropy_bits_per_word() == pytest.approx(h_doc / words, rel=1e-8)


def test_default_grammar_shape(default_grammar: Grammar) -> None:
    g = default_grammar
    assert 5 <= g.entropy_bits_per_word() <= 8
    assert 8 <= g.expected_words_per_sentence() <= 15
    assert 2000 <= len(g.vocabulary) <= 10000
    assert all(w == w.lower() and w.isalpha() for w in g.vocabulary)


def test_documents_are_seeded_and_single_line(default_grammar: Grammar) -> None:
    docs = generate_documents(default_grammar, 200, seed=3)
    assert docs == generate_documents(default_grammar, 200, seed=3)
    assert docs != generate_documents(default_grammar, 200, seed=4)
    # The grammar seed changes the vocabulary (and so the text) too.
    other = build_grammar(GrammarConfig(seed=1))
    assert generate_documents(other, 5, seed=3) != docs[:5]
    vocabulary = default_grammar.vocabulary
    for doc in docs:
        assert "\n" not in doc and "  " not in doc and doc == doc.strip()
        assert doc[0].isupper() and doc.endswith(".")
        for token in doc.split():
            assert token.rstrip(".").lower() in vocabulary


def test_sample_statistics_match_exact_values(default_grammar: Grammar) -> None:
    g = default_grammar
    rng = random.Random(7)
    samples = [g.sample_document_with_logprob(rng) for _ in range(3000)]
    lengths = [len(doc.split()) for doc, _ in samples]
    surprisals = [-log_prob for _, log_prob in samples]
    for values, exact in (
        (lengths, g.expected_words_per_document()),
        (surprisals, g.entropy_bits_per_document()),
    ):
        stderr = statistics.stdev(values) / math.sqrt(len(values))
        assert abs(statistics.fmean(values) - exact) < 4 * stderr
    # Sentences end exactly at the periods, one per sentence.
    assert all(doc.count(".") == len([t for t in doc.split() if t.endswith(".")]) for doc, _ in samples)


def test_config_errors_list_every_bad_field() -> None:
    with pytest.raises(ConfigError) as info:
        GrammarConfig(n_topics=-1, min_sentences=5, max_sentences=2, rc_prob=1.0, n_determiners=99)
    message = str(info.value)
    for field in ("n_topics", "min_sentences", "rc_prob", "n_determiners"):
        assert f"data.grammar.{field}" in message
    assert len(info.value.problems) == 4
    with pytest.raises(ConfigError, match="data.grammar.n_adjectives"):
        GrammarConfig(n_adjectives=0)
    GrammarConfig(n_adjectives=0, adj_prob=0.0, pp_prob=0.0)  # a grammar without them is fine
