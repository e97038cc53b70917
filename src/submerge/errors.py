"""Errors that users can act on.

Every error that a user can fix (a bad path, a bad config key, mismatched
checkpoints, NaN in an input) is a :class:`SubmergeError`.  The CLI prints
its message and exits with a non-zero code, without a traceback.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class SubmergeError(Exception):
    """Base class of all user-facing errors."""


class ConfigError(SubmergeError):
    """The merge configuration is invalid (unknown key, bad parameter, ...)."""


class CheckpointError(SubmergeError):
    """An input checkpoint is missing, unreadable or incompatible."""


class NonFiniteError(SubmergeError):
    """An input tensor holds NaN or Inf values."""


def suggest(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest choice, or ''.  A word longer than any name could be (a value
    pasted where a name belongs) gets no suggestion: difflib's cost grows with its length."""
    if len(word) > 200:
        return ""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def quoted(value: object, limit: int = 80) -> str:
    """``value`` as an error message quotes it: its repr, cut to ``limit`` characters (a value can be megabytes)."""
    r = repr(value)
    return r if len(r) <= limit else f"{r[:limit]}... ({len(r)} characters)"
