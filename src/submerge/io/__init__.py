"""Checkpoint reading and writing.

Names are imported on first use (PEP 562): the CLI imports :mod:`submerge.io.outdir` before any
command runs, and that must not import torch (``submerge <command> --help`` stays fast).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from submerge._lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # pragma: no cover
    from submerge.io.outdir import OutputError, atomic_folder, check_output_target  # noqa: F401
    from submerge.io.reader import Checkpoint, TensorInfo, parse_safetensors_header  # noqa: F401
    from submerge.io.writer import ShardWriter, parse_size  # noqa: F401
