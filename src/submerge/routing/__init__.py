"""ESM++ runtime: low-rank residual experts on top of a static merge, chosen per input by prototype
routing (no training).

* :func:`build_experts` — experts from state dicts (merging with method ``esm_pp`` writes them too);
* :func:`attach` — wrap a model's routed linears; :class:`Router` switches route / oracle / base;
* :func:`save` / :func:`load` — an HF folder plus ``experts.safetensors`` + ``experts.json``;
* :class:`RoutingRecorder` — per-layer routing accuracy and the confusion matrix.
"""

from submerge.routing.diagnostics import RoutingRecorder, RoutingReport
from submerge.routing.experts import ExpertSet, LayerExperts, build_experts
from submerge.routing.runtime import RoutedLinear, Router, attach, pool_tokens
from submerge.routing.saved import load, save

__all__ = ["ExpertSet", "LayerExperts", "RoutedLinear", "Router", "RoutingRecorder", "RoutingReport", "attach",
           "build_experts", "load", "pool_tokens", "save"]
