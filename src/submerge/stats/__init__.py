"""Per-model statistics and their one folder format.

* :mod:`~submerge.stats.gram` — calibration (Gram) statistics of each linear layer's inputs
  (``submerge calibrate``; ESM, RegMean, ESM++), and the essential subspace they define;
* :mod:`~submerge.stats.fisher` — the diagonal Fisher of each parameter (``submerge fisher``; Fisher and
  posterior merging);
* :mod:`~submerge.stats.folder` — the shared folder format (manifest, safetensors file, fingerprint);
* :mod:`~submerge.stats.inputs` — input files, batching and model loading for collecting either;
* :mod:`~submerge.stats.load` — :func:`load_stats`: memory or a folder of either kind.

Layers: ``folder``, ``inputs`` <- ``gram``, ``fisher`` <- ``load``.  Names below import on first use.
"""

from __future__ import annotations

from submerge._lazy import lazy_exports

_EXPORTS = {
    "LayerStats": "submerge.stats.gram",
    "CalibrationStats": "submerge.stats.gram",
    "StatsReader": "submerge.stats.gram",
    "collect_stats": "submerge.stats.gram",
    "calibrate_model_dir": "submerge.stats.gram",
    "match_layer": "submerge.stats.gram",
    "essential_subspace": "submerge.stats.gram",
    "FisherStats": "submerge.stats.fisher",
    "FisherReader": "submerge.stats.fisher",
    "fisher_diagonal": "submerge.stats.fisher",
    "fisher_model_dir": "submerge.stats.fisher",
    "load_stats": "submerge.stats.load",
    "LazyStats": "submerge.stats.load",
    "check_stats_kind": "submerge.stats.load",
    "model_fingerprint": "submerge.stats.folder",
    "read_inputs": "submerge.stats.inputs",
}
__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
