"""Which scorer an eval task names: the built-in ones by name, a user's function by ``python: module:function``."""

from __future__ import annotations

from submerge.errors import ConfigError, suggest
from submerge.evaluate.generation import GenerationScorer
from submerge.evaluate.scorers import ClassificationScorer, LMLossScorer, PythonScorer, Scorer, TaskData

BUILTIN = {"classification": ClassificationScorer, "lm_loss": LMLossScorer, "generation": GenerationScorer}


def make_scorer(task: TaskData) -> Scorer:
    spec = task.scorer
    if spec in BUILTIN:
        return BUILTIN[spec](task)
    if spec.startswith("python:"):
        return PythonScorer(task, spec[len("python:"):].strip())
    raise ConfigError(f"unknown scorer {spec!r}{suggest(spec, BUILTIN)}; use {', '.join(BUILTIN)} or "
                      f"python: module:function")
