"""``submerge analyze`` and ``submerge align``: measure a family of fine-tunes before merging it.

* :mod:`~submerge.analysis.weights` — data-free, streamed: task-vector norms, cosines, sign conflicts, top-k
  mask overlap, spectra (effective rank, subspace overlap);
* :mod:`~submerge.analysis.essential` — ESM's view from calibration statistics;
* :mod:`~submerge.analysis.paths` — with a scorer: loss paths, barriers, retention, calibration (ECE);
* :mod:`~submerge.analysis.align` — permutation alignment (Git Re-Basin weight matching);
* :mod:`~submerge.analysis.report`, :mod:`~submerge.analysis.run` — the report and the command.
"""

from __future__ import annotations

from submerge._lazy import lazy_exports

_EXPORTS = {
    "analyze": "submerge.analysis.run",
    "WeightAnalyzer": "submerge.analysis.weights",
    "EssentialAnalyzer": "submerge.analysis.essential",
    "analyze_paths": "submerge.analysis.paths",
    "weight_matching": "submerge.analysis.align",
    "align_model_dir": "submerge.analysis.align",
}
__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
