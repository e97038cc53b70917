"""LiNeS: layer-increasing scaling of a merged update, a post-processing for every task-vector method.

Wang, Dimitriadis, Favero, Ortiz-Jiménez, Fleuret & Frossard, "LiNeS: Post-training Layer Scaling Prevents
Forgetting and Enhances Model Merging", ICLR 2025 (https://arxiv.org/abs/2410.17146).

Variant (the multi-task merging rule of the authors' code): the update a merge method makes,
``τ = θ_merged − θ_0``, is rescaled per residual block ``ℓ = 0 .. L−1`` by ::

    λ_ℓ = α + β · ℓ / (L − 1)

and tensors outside the block stack (embeddings, final norm, pooler) get ``α``.  Shallow blocks stay near
the pre-trained model, deep blocks keep more of the update.  ``alpha: auto`` (the default) is the authors'
rule ``α = ‖Σ_t τ_t‖ / (T · ‖τ‖)`` with the norms over every merged tensor: the shallow end is then the plain
average of the T task vectors, whatever the method and its own scale; ``β`` is chosen on validation (the
authors' grid 0.1 .. 1.0; ``submerge.search.search_alpha(..., lines=...)`` searches it).  The blocks are the
repeated ``prefix.N.`` stack of the tensor names (``encoder.layer.N.``, ``model.layers.N.``); ``L`` is its
length.  With ``alpha: auto`` a streamed merge runs the method twice per tensor (one pass for the norms, one
to write); give ``alpha`` to merge once.

In a config::

    merge_method: tsv
    lines: {beta: 0.5}          # alpha: auto; or {alpha: 0.2, beta: 0.5}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import torch

from submerge.errors import ConfigError
from submerge.layers import layer_structure


@dataclass(frozen=True)
class Lines:
    """A LiNeS schedule: ``beta`` (the extra scale of the deepest block) and ``alpha`` (None: auto)."""

    beta: float
    alpha: Optional[float] = None

    @classmethod
    def of(cls, spec: Any) -> Optional["Lines"]:
        """From a ``Lines``, a mapping ``{beta, alpha}`` (alpha a number or "auto"), or None."""
        if spec is None or isinstance(spec, Lines):
            return spec
        if not isinstance(spec, Mapping):
            raise ConfigError(f"lines: expected {{beta: ..., alpha: auto|number}}, got {spec!r}")
        unknown = set(spec) - {"beta", "alpha"}
        if unknown:
            raise ConfigError(f"lines: unknown key(s) {sorted(unknown)}; use beta and alpha")
        if "beta" not in spec:
            raise ConfigError("lines: 'beta' is required (the extra scale of the deepest block)")
        alpha = spec.get("alpha", "auto")
        try:
            beta = float(spec["beta"])
            alpha = None if alpha in (None, "auto") else float(alpha)
        except (TypeError, ValueError):
            raise ConfigError(f"lines: beta and alpha must be numbers (alpha may be 'auto'), got {dict(spec)}") \
                from None
        for name, v in (("beta", beta), ("alpha", alpha)):
            if v is not None and not math.isfinite(v):
                raise ConfigError(f"lines: {name} must be finite, got {v}")
        return cls(beta, alpha)

    def describe(self, alpha: Optional[float] = None, blocks: Optional[int] = None) -> str:
        a = alpha if alpha is not None else self.alpha
        a_txt = f"{a:.6g}" + (" (auto: ||sum of task vectors|| / (T ||merged update||))" if self.alpha is None
                              else "")
        return (f"LiNeS (Wang et al., ICLR 2025): block l of {blocks if blocks else 'L'} scaled by "
                f"alpha + beta * l / (L - 1), alpha = {a_txt}, beta = {self.beta:.6g}; other tensors by alpha")


def block_depths(names: Iterable[str]) -> tuple[dict[str, Optional[float]], int]:
    """Per tensor name, its block's relative depth ``ℓ / (L − 1)`` (0 .. 1; None outside the block stack),
    and ``L``.  A model without a numbered block stack is an error naming what was looked for."""
    names = list(names)
    _, layers = layer_structure(names)
    if not layers:
        raise ConfigError("lines: LiNeS scales the update block by block, but no tensor name has a numbered block "
                          "('prefix.N.', as encoder.layer.N. or model.layers.N.)")
    n_blocks = 1 + max(i for i, _ in layers.values())
    den = max(n_blocks - 1, 1)
    return {n: (layers[n][0] / den if n in layers else None) for n in names}, n_blocks


def auto_alpha(sum_sq: float, update_sq: float, n_models: int) -> float:
    """The authors' ``α = ‖Σ_t τ_t‖ / (T · ‖τ‖)`` from the squared norms; ``1/T`` when the update is zero."""
    if update_sq <= 0:
        return 1.0 / n_models
    return math.sqrt(sum_sq / update_sq) / n_models


def scale_of(depth: Optional[float], alpha: float, beta: float) -> float:
    """``λ_ℓ`` of a tensor at relative depth ``depth`` (``alpha`` outside the block stack)."""
    return alpha if depth is None else alpha + beta * depth


def rescale_(merged: torch.Tensor, base: torch.Tensor, scale: float) -> torch.Tensor:
    """``base + scale · (merged − base)``, in place in ``merged``."""
    if scale == 1:
        return merged
    return merged.sub_(base).mul_(scale).add_(base)


def squared_norm(x: torch.Tensor) -> float:
    """``‖x‖²`` accumulated in float64."""
    return float(torch.linalg.vector_norm(x, dtype=torch.float64) ** 2)


def alpha_from_states(base, models, merged, names, dtype=torch.float32) -> float:
    """:func:`auto_alpha` for in-memory state dicts: ``merged`` against the ``models``' summed task vectors."""
    sum_sq = update_sq = 0.0
    for n in names:
        b = base[n].to(dtype)
        sum_sq += squared_norm(sum(sd[n].to(dtype) - b for sd in models))
        update_sq += squared_norm(merged[n].to(dtype) - b)
    return auto_alpha(sum_sq, update_sq, len(models))
