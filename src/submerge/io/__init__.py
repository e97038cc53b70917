"""Checkpoint reading and writing.

Names are imported on first use (PEP 562): the CLI imports :mod:`submerge.io.outdir` before any
command runs, and that must not import torch (``submerge <command> --help`` stays fast).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "OutputError": "submerge.io.outdir",
    "atomic_folder": "submerge.io.outdir",
    "check_output_target": "submerge.io.outdir",
    "Checkpoint": "submerge.io.reader",
    "TensorInfo": "submerge.io.reader",
    "parse_safetensors_header": "submerge.io.reader",
    "ShardWriter": "submerge.io.writer",
    "parse_size": "submerge.io.writer",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'submerge.io' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from submerge.io.outdir import OutputError, atomic_folder, check_output_target  # noqa: F401
    from submerge.io.reader import Checkpoint, TensorInfo, parse_safetensors_header  # noqa: F401
    from submerge.io.writer import ShardWriter, parse_size  # noqa: F401
