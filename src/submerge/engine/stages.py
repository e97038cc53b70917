"""Multi-stage configs (mergekit-multimerge's format): several YAML documents in one file, each a merge config;
a document's ``name`` makes it a stage that later documents may use as a model (``model: stage_a``, also
``stage_a+adapter``).  The one unnamed document is the final merge (when every document is named, the one no
other uses is).  This module parses the documents, orders the stages (a cycle is an error), and rewrites each
stage's references to where the earlier stages' results lie; :func:`submerge.api.merge` runs them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from submerge.errors import ConfigError, suggest

# the keys whose string values name a model (a stage name there means that stage's result)
MODEL_KEYS = ("model", "base_model", "tokenizer_source", "source")


@dataclass
class Stage:
    name: Optional[str]          # None: the unnamed final merge
    raw: dict[str, Any]          # the document without its name
    uses: list[str] = field(default_factory=list)  # the stages it names, in order of first use

    @property
    def label(self) -> str:
        return self.name if self.name is not None else "final merge"

    def fingerprint(self, inputs: dict[str, str]) -> str:
        """What a kept result of this stage was made from: its document and its input stages' fingerprints."""
        blob = json.dumps({"config": self.raw, "inputs": {u: inputs[u] for u in self.uses}}, sort_keys=True,
                          default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load_yaml_documents(text: str, source: str) -> list[Any]:
    """Every YAML document of ``text``, parsed as strictly as a single config."""
    from submerge.engine.config import MAX_DEPTH, _depth, _StrictLoader, refuse_nul

    try:
        docs = [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]  # noqa: S506
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None
    for d in docs:
        if _depth(d) > MAX_DEPTH:
            raise ConfigError(f"{source}: nested more than {MAX_DEPTH} levels deep")
        refuse_nul(d, source)
    return docs


def _refs(obj: Any, key: Optional[str] = None):
    """Every string under a model key, with a setter."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, str) and k in MODEL_KEYS:
                yield obj, k, v
            else:
                yield from _refs(v, k)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            if isinstance(v, str) and key in MODEL_KEYS:
                yield obj, i, v
            else:
                yield from _refs(v, key)


def _stage_of(ref: str, names: set[str]) -> Optional[str]:
    head = ref.split("+", 1)[0]
    return head if head in names else None


def plan_stages(docs: list[Any], source: str, exists: Any = os.path.lexists) -> list[Stage]:
    """The stages in the order they run, the final merge last; one line for a duplicate or missing name, two
    unnamed documents, a cycle, several candidates for the final merge, or a model reference that is neither a
    path, a Hub id nor a stage (a misspelt stage name)."""
    stages: dict[Optional[str], Stage] = {}
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise ConfigError(f"{source}: document {i + 1} is not a mapping (a merge config)")
        doc = dict(doc)
        name = doc.pop("name", None)
        if name is not None and (not isinstance(name, str) or not name.strip() or "/" in name or "+" in name):
            raise ConfigError(f"{source}: document {i + 1}: name must be a plain word (no '/' or '+'), got {name!r}")
        if name in stages:
            raise ConfigError(f"{source}: two documents are named {name!r}" if name is not None else
                              f"{source}: two documents have no name (one unnamed final merge at most)")
        stages[name] = Stage(name, doc)
    names = {n for n in stages if n is not None}
    for st in stages.values():
        for _, _, ref in _refs(st.raw):
            used = _stage_of(ref, names)
            if used is not None:
                if used not in st.uses:
                    st.uses.append(used)
            elif not exists(ref.split("+", 1)[0]) and "/" not in ref and names:
                hint = suggest(ref, names)
                if hint:
                    raise ConfigError(f"{source}: stage {st.label}: model {ref!r} is no path and no stage{hint}")
    if None in stages:
        final = None
    else:
        used_somewhere = {u for st in stages.values() for u in st.uses}
        sinks = [n for n in stages if n not in used_somewhere]
        if len(sinks) != 1:
            raise ConfigError(f"{source}: every document is named and {len(sinks)} of them are used by no other "
                              f"({', '.join(map(str, sinks))}): leave the final merge unnamed")
        final = sinks[0]
    order: list[Stage] = []
    state: dict[Optional[str], int] = {}

    def visit(name: Optional[str], path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            raise ConfigError(f"{source}: the stages use each other in a circle: {' -> '.join(map(str, cycle))}")
        state[name] = 1
        for u in stages[name].uses:
            visit(u, path + [name])
        state[name] = 2
        order.append(stages[name])

    for name in stages:
        if name != final:
            visit(name, [])
    visit(final, [])
    return order


def used_by(stages: list[Stage], stage: Stage) -> set[str]:
    """The stages ``stage`` needs, directly or through others."""
    by_name = {st.name: st for st in stages}
    needed: set[str] = set()
    todo = list(stage.uses)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += by_name[name].uses
    return needed


def with_stage_paths(stage: Stage, paths: dict[str, str]) -> dict[str, Any]:
    """The stage's document with every reference to an earlier stage replaced by where its result lies."""
    raw = json.loads(json.dumps(stage.raw))
    for holder, key, ref in list(_refs(raw)):
        used = _stage_of(ref, set(paths))
        if used is not None:
            holder[key] = paths[used] + ref[len(used):]
    return raw
