"""The built-in corpus: English-like documents from a seeded probabilistic grammar with exact entropy.

Nothing is downloaded. A :class:`Grammar` is a family of probabilistic context-free grammars (one per
topic) over pronounceable pseudo-words plus real English function words. A document picks a topic and a
number of sentences uniformly, then draws each sentence independently from the topic's grammar.

The grammar is built so that the text determines everything that was drawn: topics have disjoint noun
vocabularies (every sentence has a subject noun), all surface forms are distinct across word classes,
the period marks sentence ends, and the sentence grammar is LL(1) (each choice is decided by the next
word). Hence the entropy of a document string equals the entropy of its derivation, which the
generator computes exactly:

    H(doc) = H(topic) + H(N) + E[N] * mean_t H(sentence | t)

and the floor that any language model's held-out bits per word can approach is
``H(doc) / E[words per doc]`` with words counted as whitespace-separated tokens.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

import numpy as np

from lmexp.errors import ConfigError

Rule = tuple[float, tuple[str, ...]]

# Tolerance for rule probabilities summing to one; they are renormalised after the check.
_PROB_SUM_TOL = 1e-6


class PCFG:
    """A probabilistic context-free grammar with exact expectations and a fast seeded sampler.

    Args:
        rules: for each nonterminal, a list of ``(probability, right-hand side)``. An item of a
            right-hand side is a nonterminal iff it is a key of ``rules``; any other string is a
            terminal word. Probabilities must be positive and sum to one per nonterminal.
        start: the start symbol.
    """

    def __init__(self, rules: dict[str, Sequence[Rule]], start: str) -> None:
        if start not in rules:
            raise ValueError(f"start symbol {start!r} has no rules")
        self.start = start
        self.rules: dict[str, list[Rule]] = {}
        for lhs, options in rules.items():
            self.rules[lhs] = _normalised(lhs, options)
        self.nonterminals: list[str] = list(self.rules)
        self._index = {name: i for i, name in enumerate(self.nonterminals)}
        self._compile()

    # ----------------------------------------------------------------- exact quantities

    def mean_matrix(self) -> np.ndarray:
        """``M[A, B]``: expected number of B's in the right-hand side chosen by one expansion of A."""
        n = len(self.nonterminals)
        m = np.zeros((n, n))
        for lhs, options in self.rules.items():
            a = self._index[lhs]
            for p, rhs in options:
                for item in rhs:
                    if item in self._index:
                        m[a, self._index[item]] += p
        return m

    def _checked_mean_matrix(self) -> np.ndarray:
        """The mean matrix, after checking the grammar is subcritical (finite expected derivation size)."""
        m = self.mean_matrix()
        radius = float(np.max(np.abs(np.linalg.eigvals(m))))
        if radius >= 1.0 - 1e-12:
            raise ValueError(f"grammar is not subcritical (spectral radius {radius:.6g} >= 1)")
        return m

    def _rule_entropies(self) -> np.ndarray:
        """Entropy in bits of the rule choice at each nonterminal."""
        return np.array([_entropy_bits(p for p, _ in self.rules[lhs]) for lhs in self.nonterminals])

    def _words_per_expansion(self) -> np.ndarray:
        """Expected number of terminals written directly by one expansion of each nonterminal."""
        return np.array(
            [
                sum(p * sum(item not in self._index for item in rhs) for p, rhs in self.rules[lhs])
                for lhs in self.nonterminals
            ]
        )

    def expected_counts(self) -> dict[str, float]:
        """Expected number of expansions of each nonterminal in one derivation from the start symbol.

        Solves ``(I - M^T) c = e_start``. Raises ValueError when the grammar is not subcritical
        (spectral radius of M >= 1): derivations would then have infinite expected size.
        """
        m = self._checked_mean_matrix()
        e_start = np.zeros(len(self.nonterminals))
        e_start[self._index[self.start]] = 1.0
        counts = np.linalg.solve(np.eye(len(self.nonterminals)) - m.T, e_start)
        return {name: float(counts[i]) for i, name in enumerate(self.nonterminals)}

    def entropy_bits(self) -> float:
        """Entropy of the derivation distribution in bits: sum over A of E[count(A)] * H(rule at A).

        For an unambiguous grammar this is also the entropy of the generated word strings.
        """
        counts = self.expected_counts()
        return float(
            sum(counts[a] * h for a, h in zip(self.nonterminals, self._rule_entropies(), strict=True))
        )

    def expected_words(self) -> float:
        """Expected number of terminal words in one derivation from the start symbol."""
        counts = self.expected_counts()
        per_expansion = self._words_per_expansion()
        return float(sum(counts[a] * w for a, w in zip(self.nonterminals, per_expansion, strict=True)))

    def _per_symbol(self, local: np.ndarray) -> dict[str, float]:
        """Solve ``x = local + M x``: the expected total of ``local`` over a derivation from each symbol."""
        m = self._checked_mean_matrix()
        x = np.linalg.solve(np.eye(len(self.nonterminals)) - m, local)
        return {name: float(x[i]) for i, name in enumerate(self.nonterminals)}

    def symbol_entropy_bits(self) -> dict[str, float]:
        """Derivation entropy (bits) of the sub-derivation rooted at each nonterminal.

        The entry of the start symbol equals :meth:`entropy_bits`; the others let a caller account
        exactly for partially expanded derivations (e.g. the tail of a truncated enumeration).
        """
        return self._per_symbol(self._rule_entropies())

    def symbol_expected_words(self) -> dict[str, float]:
        """Expected number of terminal words derived from each nonterminal."""
        return self._per_symbol(self._words_per_expansion())

    # ----------------------------------------------------------------- sampling

    def _compile(self) -> None:
        """Precompute integer-coded, reversed right-hand sides and cumulative thresholds for sampling."""
        self._thresholds: list[list[float]] = []
        self._options: list[list[tuple[str | int, ...]]] = []
        self._log2p: list[list[float]] = []
        for lhs in self.nonterminals:
            options = self.rules[lhs]
            cumulative, thresholds = 0.0, []
            # The last option has no threshold, so bisect can never run past the end through rounding.
            for p, _ in options[:-1]:
                cumulative += p
                thresholds.append(cumulative)
            self._thresholds.append(thresholds)
            # Right-hand sides are pushed reversed onto a stack, so the leftmost item is expanded first.
            self._options.append(
                [tuple(self._index.get(item, item) for item in reversed(rhs)) for _, rhs in options]
            )
            self._log2p.append([math.log2(p) for p, _ in options])

    def sample(self, rng: random.Random) -> list[str]:
        """Draw one derivation and return its terminal words."""
        return self.sample_with_logprob(rng)[0]

    def sample_with_logprob(self, rng: random.Random) -> tuple[list[str], float]:
        """Draw one derivation; return its terminal words and the log2-probability of the derivation."""
        thresholds, options, log2p = self._thresholds, self._options, self._log2p
        rand = rng.random
        words: list[str] = []
        log_prob = 0.0
        stack: list[str | int] = [self._index[self.start]]
        pop, push, emit = stack.pop, stack.extend, words.append
        while stack:
            symbol = pop()
            if symbol.__class__ is str:
                emit(symbol)
                continue
            cuts = thresholds[symbol]
            choice = bisect_right(cuts, rand()) if cuts else 0  # single-rule symbols use no randomness
            push(options[symbol][choice])
            log_prob += log2p[symbol][choice]
        return words, log_prob


def _normalised(lhs: str, options: Sequence[Rule]) -> list[Rule]:
    """Check one nonterminal's rules and rescale their probabilities to sum to exactly one."""
    if not options:
        raise ValueError(f"nonterminal {lhs!r} has no rules")
    if any(not p > 0 for p, _ in options):
        raise ValueError(f"nonterminal {lhs!r} has a rule with probability <= 0")
    total = sum(p for p, _ in options)
    if abs(total - 1.0) > _PROB_SUM_TOL:
        raise ValueError(f"rule probabilities of {lhs!r} sum to {total}, not 1")
    return [(p / total, tuple(rhs)) for p, rhs in options]


def _entropy_bits(probs: Iterable[float]) -> float:
    return -sum(p * math.log2(p) for p in probs if p > 0)


def zipf_weights(n: int, offset: float = 2.7) -> list[float]:
    """Normalised Zipf-like probabilities ``p(rank) ∝ 1 / (rank + offset)`` for ranks 0..n-1."""
    raw = [1.0 / (rank + offset) for rank in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


# --------------------------------------------------------------------------- the built-in grammar

SINGULAR_DETERMINERS = ("the", "a", "every", "this", "each", "one", "no", "another")
PLURAL_DETERMINERS = ("the", "some", "these", "many", "all", "those", "two", "few")
PREPOSITIONS = ("in", "near", "with", "under", "behind", "beside", "across", "after", "before", "around")
RELATIVE_PRONOUN = "that"
FUNCTION_WORDS = frozenset(SINGULAR_DETERMINERS + PLURAL_DETERMINERS + PREPOSITIONS + (RELATIVE_PRONOUN,))

_ONSETS = tuple("b d f g k l m n p r t v z br dr gr pl tr sh".split())
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ee")
_CODAS = ("", "", "", "n", "r", "l", "m", "k", "t")  # never "s", so "-s" forms read as inflections


# Smallest allowed value of each integer field of GrammarConfig (the seed may be any integer).
_INT_MINIMUMS = {
    "n_topics": 1,
    "nouns_per_topic": 1,
    "n_verbs": 1,
    "n_adjectives": 0,
    "n_determiners": 1,
    "n_prepositions": 1,
    "min_sentences": 1,
    "max_sentences": 1,
    "seed": None,
}
# Probabilities of recursive rules must stay below one, or sentences would never end.
_BELOW_ONE = {"rc_prob", "adj_prob"}


def _int_problem(name: str, value: object, minimum: int | None) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return f"{name} must be an integer (got {value!r})"
    if minimum is not None and value < minimum:
        return f"{name} must be >= {minimum} (got {value})"
    return None


def _probability_problem(name: str, value: object, allow_one: bool) -> str | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return f"{name} must be a number (got {value!r})"
    if value < 0 or value > 1 or (value == 1 and not allow_one):
        return f"{name} must be in {'[0, 1]' if allow_one else '[0, 1)'} (got {value})"
    return None


@dataclass
class GrammarConfig:
    """Shape of the built-in grammar; the same config always builds the same grammar."""

    n_topics: int = 8
    """Number of topics; a document's topic is uniform over them."""
    nouns_per_topic: int = 200
    """Noun stems per topic; topics have disjoint nouns, so every sentence reveals its topic."""
    n_verbs: int = 200
    """Verb stems of each kind (transitive and intransitive) in the pool shared by all topics."""
    n_adjectives: int = 300
    """Adjectives in the pool shared by all topics (may be 0 only when adj_prob is 0)."""
    n_determiners: int = 5
    """How many of the built-in determiners each number (singular, plural) uses."""
    n_prepositions: int = 8
    """How many of the built-in prepositions sentence-final prepositional phrases use."""
    min_sentences: int = 3
    """Fewest sentences in a document; the count is uniform over [min_sentences, max_sentences]."""
    max_sentences: int = 8
    """Most sentences in a document."""
    rc_prob: float = 0.2
    """Probability that a noun phrase carries a relative clause ("that" + verb phrase)."""
    adj_prob: float = 0.35
    """Probability of one more adjective before a noun (adjective count is geometric)."""
    pp_prob: float = 0.5
    """Probability that a sentence ends with a prepositional phrase."""
    transitive_prob: float = 0.7
    """Probability that a verb phrase is transitive (verb + object noun phrase)."""
    singular_prob: float = 0.6
    """Probability that a noun phrase (subject or object) is singular."""
    seed: int = 0
    """Seed of the grammar itself: vocabulary and word weights (not of the sampled documents)."""

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ConfigError(problems)

    def _problems(self) -> list[str]:
        """All invalid fields, each named as ``data.grammar.<field>``."""
        problems: list[str] = []
        for f in fields(self):
            value, name = getattr(self, f.name), f"data.grammar.{f.name}"
            if f.name in _INT_MINIMUMS:
                problem = _int_problem(name, value, _INT_MINIMUMS[f.name])
            else:
                problem = _probability_problem(name, value, allow_one=f.name not in _BELOW_ONE)
            if problem:
                problems.append(problem)
        return problems + self._cross_field_problems(problems)

    def _cross_field_problems(self, earlier: list[str]) -> list[str]:
        """Problems that involve two fields or the built-in word lists (skipped for fields already bad)."""
        bad = {p.split()[0] for p in earlier}
        problems: list[str] = []
        pre = "data.grammar."
        if (
            not {pre + "min_sentences", pre + "max_sentences"} & bad
            and self.min_sentences > self.max_sentences
        ):
            problems.append(
                f"{pre}min_sentences ({self.min_sentences}) must be <= "
                f"{pre}max_sentences ({self.max_sentences})"
            )
        n_det = min(len(SINGULAR_DETERMINERS), len(PLURAL_DETERMINERS))
        if pre + "n_determiners" not in bad and self.n_determiners > n_det:
            problems.append(f"{pre}n_determiners must be <= {n_det} (got {self.n_determiners})")
        if pre + "n_prepositions" not in bad and self.n_prepositions > len(PREPOSITIONS):
            problems.append(f"{pre}n_prepositions must be <= {len(PREPOSITIONS)} (got {self.n_prepositions})")
        if (
            not {pre + "n_adjectives", pre + "adj_prob"} & bad
            and self.n_adjectives == 0
            and self.adj_prob > 0
        ):
            problems.append(f"{pre}n_adjectives must be >= 1 when {pre}adj_prob > 0 (got 0)")
        return problems


class _WordMaker:
    """Draws distinct pronounceable pseudo-words; every surface form it hands out is new."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set(FUNCTION_WORDS)

    def _candidate(self, n_syllables: int) -> str:
        parts = []
        for i in range(n_syllables):
            coda = self.rng.choice(_CODAS) if i == n_syllables - 1 else ""
            parts.append(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + coda)
        return "".join(parts)

    def stem(self, suffixes: tuple[str, ...]) -> str:
        """A new stem whose forms ``stem + suffix`` (for each suffix) collide with nothing handed out."""
        attempts = 0
        while True:
            # Widen the space (more syllables) if short words are getting crowded.
            n_syllables = 2 + (self.rng.random() < 0.35) + attempts // 50
            candidate = self._candidate(n_syllables)
            forms = {candidate + s for s in suffixes}
            if len(forms) == len(suffixes) and not forms & self.used:
                self.used |= forms
                return candidate
            attempts += 1


def _lexical(words: Sequence[str], probs: Sequence[float]) -> list[Rule]:
    return [(p, (w,)) for w, p in zip(words, probs, strict=True)]


def _keep_positive(options: list[Rule]) -> list[Rule]:
    """Drop rules with probability zero (e.g. pp_prob = 0), which a PCFG does not accept."""
    return [(p, rhs) for p, rhs in options if p > 0]


class Grammar:
    """The built-in document grammar: one sentence PCFG per topic plus uniform topic and length.

    Attributes:
        config: the config it was built from.
        topic_pcfgs: the sentence grammar of each topic (start symbol ``S``).
    """

    def __init__(self, config: GrammarConfig) -> None:
        self.config = config
        rng = random.Random(config.seed)
        maker = _WordMaker(rng)
        self.topic_nouns = [
            [maker.stem(("", "s")) for _ in range(config.nouns_per_topic)] for _ in range(config.n_topics)
        ]
        self.transitive_verbs = [maker.stem(("", "s")) for _ in range(config.n_verbs)]
        self.intransitive_verbs = [maker.stem(("", "s")) for _ in range(config.n_verbs)]
        self.adjectives = [maker.stem(("",)) for _ in range(config.n_adjectives)]
        self._vocabulary = frozenset(self._surface_forms())
        self.topic_pcfgs = [self._topic_pcfg(t, rng) for t in range(config.n_topics)]
        self._n_lengths = config.max_sentences - config.min_sentences + 1

    def _surface_forms(self) -> set[str]:
        c = self.config
        forms = set(SINGULAR_DETERMINERS[: c.n_determiners] + PLURAL_DETERMINERS[: c.n_determiners])
        forms |= set(PREPOSITIONS[: c.n_prepositions]) | {RELATIVE_PRONOUN} | set(self.adjectives)
        for stems in [*self.topic_nouns, self.transitive_verbs, self.intransitive_verbs]:
            forms |= set(stems) | {s + "s" for s in stems}
        return forms

    def _topic_pcfg(self, topic: int, rng: random.Random) -> PCFG:
        """The sentence grammar of one topic: its own nouns, re-ranked shared verbs and adjectives."""
        c = self.config

        def reranked(words: list[str]) -> list[float]:
            # A topic-specific permutation of Zipf ranks: shared words, topic-dependent frequencies.
            ranks = list(range(len(words)))
            rng.shuffle(ranks)
            zipf = zipf_weights(len(words))
            return [zipf[r] for r in ranks]

        nouns = self.topic_nouns[topic]
        tv_probs, iv_probs = reranked(self.transitive_verbs), reranked(self.intransitive_verbs)
        adj_probs = reranked(self.adjectives)
        sg, pp, rc, adj, tv = c.singular_prob, c.pp_prob, c.rc_prob, c.adj_prob, c.transitive_prob
        rules: dict[str, list[Rule]] = {
            "S": [
                (sg * (1 - pp), ("NP_sg", "VP_sg")),
                (sg * pp, ("NP_sg", "VP_sg", "PP")),
                ((1 - sg) * (1 - pp), ("NP_pl", "VP_pl")),
                ((1 - sg) * pp, ("NP_pl", "VP_pl", "PP")),
            ],
            "NP": [(sg, ("NP_sg",)), (1 - sg, ("NP_pl",))],  # objects take either number
            "PP": [(1.0, ("Prep", "NP"))],
            "Prep": _lexical(PREPOSITIONS[: c.n_prepositions], zipf_weights(c.n_prepositions)),
            "Adj": _lexical(self.adjectives, adj_probs),
        }
        noun_probs = zipf_weights(len(nouns))
        det_probs = zipf_weights(c.n_determiners)
        for num, suffix, dets in (("sg", "", SINGULAR_DETERMINERS), ("pl", "s", PLURAL_DETERMINERS)):
            verb_suffix = "s" if num == "sg" else ""  # "the dog runs" / "the dogs run"
            rules |= {
                f"NP_{num}": [
                    (1 - rc, (f"Det_{num}", f"Nbar_{num}")),
                    (rc, (f"Det_{num}", f"Nbar_{num}", f"RC_{num}")),
                ],
                f"Nbar_{num}": [(adj, ("Adj", f"Nbar_{num}")), (1 - adj, (f"Noun_{num}",))],
                f"RC_{num}": [(1.0, (RELATIVE_PRONOUN, f"VP_{num}"))],
                f"VP_{num}": [(tv, (f"TV_{num}", "NP")), (1 - tv, (f"IV_{num}",))],
                f"Det_{num}": _lexical(dets[: c.n_determiners], det_probs),
                f"Noun_{num}": _lexical([n + suffix for n in nouns], noun_probs),
                f"TV_{num}": _lexical([v + verb_suffix for v in self.transitive_verbs], tv_probs),
                f"IV_{num}": _lexical([v + verb_suffix for v in self.intransitive_verbs], iv_probs),
            }
        rules = {lhs: _keep_positive(options) for lhs, options in rules.items()}
        return PCFG({lhs: options for lhs, options in rules.items() if options}, start="S")

    # ----------------------------------------------------------------- sampling

    @staticmethod
    def render_sentence(words: Sequence[str]) -> str:
        """Surface text of one sentence: capitalised first letter, period on the last word."""
        text = " ".join(words)
        return text[0].upper() + text[1:] + "."

    def sample_document_with_logprob(self, rng: random.Random) -> tuple[str, float]:
        """Draw one document; return its text (one line) and its log2-probability."""
        c = self.config
        topic = rng.randrange(c.n_topics)
        n_sentences = rng.randint(c.min_sentences, c.max_sentences)
        pcfg = self.topic_pcfgs[topic]
        log_prob = -math.log2(c.n_topics) - math.log2(self._n_lengths)
        sentences = []
        for _ in range(n_sentences):
            words, sentence_log_prob = pcfg.sample_with_logprob(rng)
            sentences.append(self.render_sentence(words))
            log_prob += sentence_log_prob
        return " ".join(sentences), log_prob

    def sample_document(self, rng: random.Random) -> str:
        """Draw one document: its sentences on one line, joined by single spaces."""
        return self.sample_document_with_logprob(rng)[0]

    # ----------------------------------------------------------------- exact quantities

    def expected_sentences_per_document(self) -> float:
        """E[N] for N uniform over [min_sentences, max_sentences]."""
        return (self.config.min_sentences + self.config.max_sentences) / 2

    def expected_words_per_sentence(self) -> float:
        """Mean sentence length in words, averaged over the (uniform) topics."""
        return sum(p.expected_words() for p in self.topic_pcfgs) / len(self.topic_pcfgs)

    def entropy_bits_per_document(self) -> float:
        """Exact entropy of a document string: H(topic) + H(N) + E[N] * mean over topics of H(S | t)."""
        mean_sentence_bits = sum(p.entropy_bits() for p in self.topic_pcfgs) / len(self.topic_pcfgs)
        return (
            math.log2(self.config.n_topics)
            + math.log2(self._n_lengths)
            + self.expected_sentences_per_document() * mean_sentence_bits
        )

    def expected_words_per_document(self) -> float:
        """E[N] * sum_t p(t) E[len | t]: the number of whitespace-separated tokens per document."""
        return self.expected_sentences_per_document() * self.expected_words_per_sentence()

    def entropy_bits_per_word(self) -> float:
        """The floor: document entropy over expected words per document, in bits per word."""
        return self.entropy_bits_per_document() / self.expected_words_per_document()

    @property
    def vocabulary(self) -> set[str]:
        """Every surface word form (lower-case, without the sentence period)."""
        return set(self._vocabulary)


def build_grammar(config: GrammarConfig) -> Grammar:
    """Build the grammar a config describes (deterministic in the config, including its seed)."""
    return Grammar(config)


def generate_documents(grammar: Grammar, n_documents: int, seed: int) -> list[str]:
    """Draw ``n_documents`` documents with a generator seeded by ``seed`` (same seed, same corpus)."""
    rng = random.Random(seed)
    return [grammar.sample_document(rng) for _ in range(n_documents)]
