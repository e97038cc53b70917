"""The ``eval:`` block of a tune or analyze config: per task, its validation data and how it is scored.

Each entry names a task (``name``) and its expert (``ref``, as written in the config); the block gives every
task a data file, a scorer (``classification``, ``lm_loss``, ``generation`` or ``{python: file.py:function}``, a
relative file resolved against the config's folder, as the data are) and its options, checked here before any model
is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Sequence

from submerge.errors import ConfigError, quoted, suggest

EVAL_KEYS = ("data", "scorer", "field", "label_field", "max_length", "batch_size", "n", "model_class", "options")


class TaskRef(NamedTuple):
    """A task as the eval block knows it: its name and its expert as the config writes it."""

    name: str
    ref: str


def resolve_ref(ref: str, config_dir: Path) -> str:
    """A model reference as written in a config: a local path made absolute (against the config's folder),
    anything else (a Hub id) unchanged."""
    p = Path(ref).expanduser()
    q = p if p.is_absolute() else config_dir / p
    return str(q.resolve()) if q.exists() else ref


def known_keys(block: dict, allowed: Any, where: str) -> None:
    """Refuse a key of ``block`` that ``allowed`` lacks, with a suggestion (one line)."""
    bad = sorted(set(block) - set(allowed))
    if bad:
        raise ConfigError(f"{where}: unknown key {bad[0]!r}{suggest(bad[0], allowed)}; keys: {sorted(allowed)}")


def eval_tasks(block: Any, entries: Sequence[Any], config_dir: Path) -> list:
    """The eval block as one :class:`~submerge.evaluate.scorers.TaskData` per entry (anything with ``name`` and
    ``ref``: a :class:`TaskRef`, tune's model entries), in entry order; every check that needs no model."""
    from submerge.evaluate.scorers import TaskData

    if not isinstance(block, dict) or "tasks" not in block:
        raise ConfigError("eval: give 'tasks:' (per task: data, and optionally scorer, field, label_field)")
    defaults = {k: v for k, v in block.items() if k != "tasks"}
    known_keys(defaults, [k for k in EVAL_KEYS if k != "data"] + ["tasks"], "eval")
    tasks = block["tasks"]
    names = [e.name for e in entries]
    if isinstance(tasks, list):
        if len(tasks) != len(entries):
            raise ConfigError(f"eval.tasks lists {len(tasks)} task(s) for {len(entries)} models; give one per "
                              f"model (in order) or a mapping by task name ({names})")
        by_name = dict(zip(names, tasks))
    elif isinstance(tasks, dict):
        unknown = [k for k in tasks if k not in names]
        if unknown:
            raise ConfigError(f"eval.tasks: {unknown[0]!r} is not a task{suggest(str(unknown[0]), names)}; "
                              f"tasks (the models' names): {names}")
        missing = [n for n in names if n not in tasks]
        if missing:
            raise ConfigError(f"eval.tasks: no eval data for task(s) {missing}: every model is scored on its "
                              f"own task")
        by_name = tasks
    else:
        raise ConfigError("eval.tasks: a list (one per model, in order) or a mapping by task name")
    out = []
    for e in entries:
        spec = by_name[e.name]
        if isinstance(spec, str):
            spec = {"data": spec}
        if not isinstance(spec, dict) or "data" not in spec:
            raise ConfigError(f"eval.tasks.{e.name}: give 'data: <file>'")
        known_keys(spec, EVAL_KEYS, f"eval.tasks.{e.name}")
        s = {**defaults, **spec}
        scorer = s.get("scorer", "classification")
        if isinstance(scorer, dict) and set(scorer) == {"python"}:
            scorer = f"python:{scorer['python']}"
        if not isinstance(scorer, str):
            raise ConfigError(f"eval.tasks.{e.name}: scorer is classification, lm_loss, generation or "
                              f"{{python: module:function}}")
        scorer = _scorer_file_in(scorer, config_dir)
        options = s.get("options") or {}
        if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
            raise ConfigError(f"eval.tasks.{e.name}: options must be a mapping of names to values (the python "
                              f"scorer's task.options), got {quoted(options)}")
        data = Path(str(s["data"])).expanduser()
        data = data if data.is_absolute() else config_dir / data
        expert = Path(resolve_ref(e.ref.split("+")[-1], config_dir))
        for k in ("max_length", "batch_size"):
            if k in s and (type(s[k]) is not int or s[k] < 1):
                raise ConfigError(f"eval.tasks.{e.name}: {k} must be a positive integer, got {s[k]!r}")
        if s.get("n") is not None and (type(s["n"]) is not int or s["n"] < 1):
            raise ConfigError(f"eval.tasks.{e.name}: n must be a positive integer, got {s['n']!r}")
        out.append(TaskData(
            name=e.name, data=data, expert=expert, scorer=scorer, field=s.get("field") or "text",
            label_field=s.get("label_field") or "label", max_length=s.get("max_length", 128),
            batch_size=s.get("batch_size", 32), n=s.get("n"), model_class=s.get("model_class", "AutoModel"),
            options=dict(options)))
    return out


def _scorer_file_in(scorer: str, config_dir: Path) -> str:
    """``python: file.py:function`` with a relative file resolved against the config's folder (as the eval data
    are), so a config runs the same scorer wherever it is run from."""
    if not scorer.startswith("python:"):
        return scorer
    mod, sep, fn = scorer[len("python:"):].strip().rpartition(":")
    if sep and mod.endswith(".py") and not Path(mod).expanduser().is_absolute():
        return f"python:{config_dir / mod}:{fn}"
    return scorer
