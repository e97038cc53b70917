"""The inputs of a run, recorded where they are read, so no OUT check can forget a kind of input.

Every file or folder submerge reads on a user's behalf passes through :mod:`submerge.io.files`
(:func:`~submerge.io.files.checked_file`, :func:`~submerge.io.files.checked_folder`,
:func:`~submerge.io.files.read_user_text`) or opens a :class:`~submerge.io.reader.Checkpoint`; each of
those calls :func:`record`.  While a run is open (:func:`run_scope`, :func:`one_run`), the recorded paths
are inputs of that run: :func:`~submerge.io.outdir.check_output_target` refuses an OUT that equals,
contains or lies inside any of them, before the run starts writing and again just before the finished
result replaces OUT.  A command therefore cannot delete a file it read, whatever kind of input the file
was (a model, an eval file, a scorer module, a calibration cache, a tokenizer handed to transformers).

The record is process-wide (reads on worker threads count too) and scoped: the outermost
:func:`run_scope` starts an empty record and ends it; nested scopes (a command calling another, such as
``analyze`` merging for its scored pass) share the outer one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar, Union

F = TypeVar("F", bound=Callable[..., Any])

_lock = threading.Lock()
_record: Optional[set[str]] = None
_depth = 0


@contextlib.contextmanager
def run_scope() -> Iterator[None]:
    """Record every input read inside the block (the outermost scope owns the record)."""
    global _record, _depth
    with _lock:
        if _depth == 0:
            _record = set()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _record = None


def one_run(fn: F) -> F:
    """Decorate a public function that writes a folder: its whole call is one :func:`run_scope`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with run_scope():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def record(path: Union[str, os.PathLike, None]) -> None:
    """Note ``path`` (a file or folder being read) as an input of the open run; a no-op outside one."""
    if path is None or _record is None:
        return
    p = os.path.abspath(os.path.expanduser(os.fspath(path)))
    with _lock:
        if _record is not None:
            _record.add(p)


def recorded() -> list[Path]:
    """The inputs read so far in the open run (empty outside one)."""
    with _lock:
        return [Path(p) for p in sorted(_record or ())]
