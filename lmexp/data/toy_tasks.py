"""Tiny local fine-tuning data sets, generated from the built-in corpus's words (no download).

``python -m lmexp.data.toy_tasks <dir>`` writes train/val/test files of five tasks, so that every
fine-tuning example in the README runs from a fresh clone:

- ``classify-*.jsonl`` (``task=classify``, ``{"text", "label"}``): a sentence "The <noun> <verb>s the
  <noun>." (an adjective before a noun now and then), both nouns of one of four topics of the built-in
  grammar; the label is that topic, ``topic0`` ... ``topic3`` (chance: 25%). A topic's nouns are its
  eight most frequent ones, so a briefly pre-trained model has seen them;
- ``ner-*.conll`` (``task=ner``, CoNLL: ``token tag`` lines, a blank line between sentences): "the <entity>
  <verb>s the <entity>" with now and then "<preposition> the <entity>" after it; an entity is one or two
  nouns of topic 0 or topic 1 (eight each), tagged in BIO as ``B-T0 I-T0`` or ``B-T1 I-T1``; every other
  word is ``O``. The tag of a word is its noun's topic, the B/I split its place in the entity;
- ``squad-*.jsonl`` (``task=qa``, Hugging Face's squad layout): a context of short facts, "The <noun>
  <verb>s the <noun>." about different subjects, and a question about one of them, "What does the <noun>
  <verb>?", whose answer is that fact's object, with its character offset;
- ``summarize-*.jsonl`` (``task=sft``, prompt/completion): a built-in document after ``"Summarize: "``,
  and its first sentence as the summary (a lead-1 summary: the model has to find where it ends);
- ``translate-*.jsonl`` (``task=sft``, chat messages): a system turn, a user turn asking to translate a
  short sentence into an invented language, and the assistant's word-by-word translation (a fixed
  dictionary of 40 words; the word order is kept).

Nouns and verbs come from one topic of the built-in grammar, so a model pre-trained on the built-in corpus
knows the words. Everything is deterministic in the seed.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

from lmexp.cache import atomic_write_text
from lmexp.data.corpus import Grammar, GrammarConfig, build_grammar, generate_documents
from lmexp.errors import ConfigError

SPLITS = {"train": 400, "val": 50, "test": 50}
CLASSIFY_TOPICS, TOPIC_NOUNS = 4, 8  # topics of the classify set; nouns per topic (classify and ner)
NER_PREPOSITIONS = ("near", "with", "under")
TRANSLATION_WORDS = 40
SYSTEM_PROMPT = "You translate English into Lexish."


def qa_rows(grammar: Grammar, n: int, seed: int, n_facts: tuple[int, int] = (3, 6)) -> list[dict[str, Any]]:
    """``n`` questions ``{id, question, context, answers: {text, answer_start}}`` about fact contexts."""
    rng = random.Random(seed)
    nouns = grammar.topic_nouns[0][:30]
    verbs = grammar.transitive_verbs[:12]
    rows = []
    for index in range(n):
        subjects = rng.sample(nouns, rng.randint(*n_facts))
        facts = [(subject, rng.choice(verbs), rng.choice(nouns)) for subject in subjects]
        sentences = [f"The {s} {v}s the {o}." for s, v, o in facts]
        asked = rng.randrange(len(facts))
        subject, verb, answer = facts[asked]
        start = sum(len(s) + 1 for s in sentences[:asked]) + len(f"The {subject} {verb}s the ")
        context = " ".join(sentences)
        assert context[start : start + len(answer)] == answer
        rows.append(
            {
                "id": f"q{seed}-{index}",
                "question": f"What does the {subject} {verb}?",
                "context": context,
                "answers": {"text": [answer], "answer_start": [start]},
            }
        )
    return rows


def classify_rows(grammar: Grammar, n: int, seed: int) -> list[dict[str, str]]:
    """``n`` rows ``{text, label}``: a sentence whose two nouns are of the topic named by its label."""
    rng = random.Random(seed)
    verbs = grammar.transitive_verbs[:12]
    rows = []
    for _ in range(n):
        topic = rng.randrange(CLASSIFY_TOPICS)
        nouns = grammar.topic_nouns[topic][:TOPIC_NOUNS]
        words = ["The", _maybe_adjective(grammar, rng), rng.choice(nouns), rng.choice(verbs) + "s", "the"]
        words += [_maybe_adjective(grammar, rng), rng.choice(nouns)]
        rows.append({"text": " ".join(w for w in words if w) + ".", "label": f"topic{topic}"})
    return rows


def _maybe_adjective(grammar: Grammar, rng: random.Random) -> str:
    """One of a few adjectives a third of the time, else "" (no word)."""
    return rng.choice(grammar.adjectives[:6]) if rng.random() < 1 / 3 else ""


def ner_rows(grammar: Grammar, n: int, seed: int) -> list[dict[str, list[str]]]:
    """``n`` sentences ``{tokens, tags}`` whose entities (one or two nouns of topic 0 or 1) are BIO-tagged."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        verb = rng.choice(grammar.transitive_verbs[:12]) + "s"
        pairs = [("the", "O"), *_entity(grammar, rng), (verb, "O"), ("the", "O"), *_entity(grammar, rng)]
        if rng.random() < 0.5:
            pairs += [(rng.choice(NER_PREPOSITIONS), "O"), ("the", "O"), *_entity(grammar, rng)]
        rows.append({"tokens": [word for word, _ in pairs], "tags": [tag for _, tag in pairs]})
    return rows


def _entity(grammar: Grammar, rng: random.Random) -> list[tuple[str, str]]:
    """One or two nouns of topic 0 or 1 with their BIO tags: ``B-T<topic>`` then ``I-T<topic>``."""
    topic = rng.randrange(2)
    nouns = grammar.topic_nouns[topic][:TOPIC_NOUNS]
    return [(rng.choice(nouns), f"{'I' if i else 'B'}-T{topic}") for i in range(rng.choice((1, 1, 2)))]


def conll_text(rows: list[dict[str, list[str]]]) -> str:
    """CoNLL lines: ``token tag`` per word, a blank line after each sentence."""
    return "".join(
        "".join(f"{t} {g}\n" for t, g in zip(r["tokens"], r["tags"], strict=True)) + "\n" for r in rows
    )


def summarize_rows(grammar: Grammar, n: int, seed: int) -> list[dict[str, str]]:
    """``n`` rows ``{prompt: "Summarize: <document>\\nSummary:", completion: <its first sentence>}``."""
    rows = []
    for document in generate_documents(grammar, n, seed):
        first = document.split(". ")[0].rstrip(".") + "."
        rows.append({"prompt": f"Summarize: {document}\nSummary:", "completion": first})
    return rows


def lexicon(grammar: Grammar, seed: int = 0) -> dict[str, str]:
    """A fixed English -> Lexish dictionary over a few function words, nouns, verbs and adjectives."""
    rng = random.Random(seed)
    verbs = [verb + "s" for verb in grammar.transitive_verbs[:11]]  # singular subjects only
    english = ["the", "a", "that", *grammar.topic_nouns[0][:16], *verbs]
    english += grammar.adjectives[: TRANSLATION_WORDS - len(english)]
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    lexish: set[str] = set()
    mapping = {}
    for word in english:
        while True:
            candidate = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(1, 3)))
            if candidate not in lexish:
                break
        lexish.add(candidate)
        mapping[word] = candidate
    return mapping


def translate_rows(grammar: Grammar, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` chats: system, user ("Translate into Lexish: <sentence>"), assistant (the translation)."""
    rng = random.Random(seed)
    words = lexicon(grammar)
    nouns = grammar.topic_nouns[0][:16]
    verbs = [verb + "s" for verb in grammar.transitive_verbs[:11]]
    adjectives = [a for a in grammar.adjectives if a in words]
    rows = []
    for _ in range(n):
        sentence = [rng.choice(["the", "a"])]
        if rng.random() < 0.5:
            sentence.append(rng.choice(adjectives))
        sentence += [rng.choice(nouns), rng.choice(verbs)]
        sentence += [rng.choice(["the", "a", "that"]), rng.choice(nouns)]
        english = " ".join(sentence)
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": f"Translate into Lexish: {english}"},
                    {"role": "assistant", "content": " ".join(words[w] for w in sentence)},
                ]
            }
        )
    return rows


def write_toy_tasks(directory: str | Path, seed: int = 0, sizes: dict[str, int] | None = None) -> list[Path]:
    """Write ``squad-``, ``summarize-``, ``translate-``, ``classify-{train,val,test}.jsonl`` and
    ``ner-{train,val,test}.conll`` into ``directory``."""
    directory = Path(directory).expanduser()
    grammar = build_grammar(GrammarConfig())
    makers = {
        "squad": qa_rows,
        "summarize": summarize_rows,
        "translate": translate_rows,
        "classify": classify_rows,
        "ner": ner_rows,
    }
    written = []
    for offset, (split, n) in enumerate((sizes or SPLITS).items()):
        for name, make in makers.items():
            rows = make(grammar, n, seed * 1000 + offset)
            if name == "ner":
                path, text = directory / f"{name}-{split}.conll", conll_text(rows)
            else:
                path, text = directory / f"{name}-{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows)
            atomic_write_text(path, text)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    """``python -m lmexp.data.toy_tasks <dir>``: write the toy data sets into ``<dir>``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        raise ConfigError("usage: python -m lmexp.data.toy_tasks <directory>  (writes the toy data sets)")
    for path in write_toy_tasks(args[0]):
        print(path)


if __name__ == "__main__":
    from lmexp.cli import run_command

    run_command(main)
