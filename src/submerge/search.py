"""Choosing a method's global scale (λ / α) on validation data: :func:`search_alpha`.

Every registered method that declares a ``scale_param`` is affine in it
(θ(α) = θ(0) + α·(θ(1) − θ(0)): the scale multiplies an update computed without it),
so the search merges twice — at 0 and at 1 — and every further point costs one
axpy over the loaded tensors, never a new merge.  Strategies:

* ``grid``: the papers' grids (TA/TIES 0.1..1.0; TSV/Iso 0.1..3.0), stopped after
  ``patience`` points without improvement, and continued past the upper edge (same
  step) while the edge scores the best so far (with ``patience``, ties included: exact
  match on a few hundred questions is flat over steps of 0.1, and stopping on the first
  flat step past the edge left Iso-CTS at α 3.1 where the curve climbed to 6);
* ``golden``: golden-section search on the method's bounds (ESM: [0, 2] for the ViT
  recipe, [0, 5] for the GLUE recipe, tolerance 0.01, at most 15 evaluations, as the
  ESM code); if the best point lands at the upper edge the bracket moves up;
* ``coarse``: for a quick look — six evenly spaced points up to the top of the method's
  grid or bounds, stopped one point after the best (and continued past the edge as
  ``grid``), then one bisection step on each side of the best point: about 6 evaluations
  where ``grid`` spends 10–20 on a curve that is flat at this resolution.

The result is the evaluated point with the best score (ties: the smaller scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from submerge.engine.memory import merge_state_dicts_many
from submerge.errors import ConfigError
from submerge.methods import get_method

_GOLDEN = (math.sqrt(5) - 1) / 2
_TIE = 1e-9  # relative: two means of different per-task scores can tie up to the last bit (0.7055248133509003/4)


@dataclass
class SearchResult:
    method: str
    scale_param: str
    alpha: float
    score: float
    curve: dict[float, float]
    strategy: str
    state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    path: Optional["AffinePath"] = field(repr=False, default=None)  # any other scale: path(a, copy=True)
    eval_order: list[float] = field(repr=False, default_factory=list)  # the scales in the order scored
    lines_alpha: Optional[float] = None  # with LiNeS: its alpha (then ``alpha`` above is LiNeS' beta)

    @property
    def evaluations(self) -> int:
        return len(self.curve)


class AffinePath:
    """θ(α) = θ(0) + α·(θ(1) − θ(0)) over one set of tensors, materialised into a reused buffer."""

    def __init__(self, at0: Mapping[str, torch.Tensor], at1: Mapping[str, torch.Tensor]):
        self.at0 = {k: v.float() for k, v in at0.items() if v.is_floating_point()}
        self.direction = {k: at1[k].float() - self.at0[k] for k in self.at0}
        self.other = {k: v for k, v in at0.items() if not v.is_floating_point()}
        self._buf = {k: torch.empty_like(v) for k, v in self.at0.items()}
        self.dtypes = {k: at1[k].dtype for k in self.at0}

    def __call__(self, alpha: float, copy: bool = False) -> dict[str, torch.Tensor]:
        out = {}
        for k, x0 in self.at0.items():
            buf = torch.empty_like(x0) if copy else self._buf[k]
            torch.add(x0, self.direction[k], alpha=alpha, out=buf)
            out[k] = buf if self.dtypes[k] == buf.dtype else buf.to(self.dtypes[k])
        out.update(self.other)
        return out


def affine_path(method: str, base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]],
                parameters: Optional[dict] = None, model_parameters: Optional[Sequence[Optional[dict]]] = None,
                **kw: Any) -> AffinePath:
    """``method``'s merge as a function of its scale: one merge at 1, every other scale one axpy from the base
    (``kw``: ``stats``, ``random_seed``).  θ(0) is the base itself: a searched scale multiplies the whole update
    (every registered method gives the base bit for bit at 0; tests/test_subspace_esm.py checks each), so the
    merge at 0 — half a search's merge time for the SVD methods — is never computed."""
    m = get_method(method)
    if not m.needs_base:
        raise ConfigError(f"{method}: a scale path starts at the base model, and {method} takes none")
    params = dict(parameters or {})
    at1 = merge_state_dicts_many(method, base, models, [{**params, m.scale_param: 1.0}], model_parameters, **kw)[0]
    return AffinePath(base, at1)


def _grid_search(path: AffinePath, score_fn, grid: Sequence[float], patience: Optional[int],
                 extend: bool, max_evals: int) -> dict[float, float]:
    curve: dict[float, float] = {}
    grid = sorted(grid)
    step = (grid[-1] - grid[-2]) if len(grid) > 1 else grid[0]
    best, since = -math.inf, 0
    i = 0
    points = list(grid)
    while i < len(points) and len(curve) < max_evals:
        a = round(points[i], 6)
        curve[a] = float(score_fn(path(a)))
        if curve[a] > best:
            best, since = curve[a], 0
        else:
            since += 1
            if patience is not None and since >= patience:
                break
        i += 1
        # the upper edge scores the best so far (a tie counts: a flat step is not yet a decline, and stops only
        # after `patience` of them; without patience a tie stops): continue the grid
        if i == len(points) and extend and curve[a] >= best - _TIE * abs(best) and since < (patience or 1):
            points.append(a + step)
    return curve


def _golden_search(path: AffinePath, score_fn, bounds: tuple[float, float], tol: float, max_iter: int,
                   extend: bool) -> dict[float, float]:
    curve: dict[float, float] = {}

    def f(a: float) -> float:
        a = round(a, 6)
        if a not in curve:
            curve[a] = float(score_fn(path(a)))
        return curve[a]

    lo, hi = bounds
    for _attempt in range(3 if extend else 1):
        a, b = lo, hi
        c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
        fc, fd = f(c), f(d)
        for _ in range(max_iter):
            if abs(b - a) < tol:
                break
            if fc >= fd:
                b, d, fd = d, c, fc
                c = b - _GOLDEN * (b - a)
                fc = f(c)
            else:
                a, c, fc = c, d, fd
                d = a + _GOLDEN * (b - a)
                fd = f(d)
        best = max(curve, key=lambda x: (curve[x], -x))
        width = hi - lo
        if not extend or best < hi - 0.05 * width:
            break
        lo, hi = hi - 0.25 * width, hi + width  # optimum at the upper edge: move the bracket up
    return curve


def search_alpha(
    method: str,
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    score_fn: Callable[[dict[str, torch.Tensor]], float],
    parameters: Optional[dict] = None,
    model_parameters: Optional[Sequence[Optional[dict]]] = None,
    *,
    stats: Optional[Sequence[Any]] = None,
    strategy: str = "auto",
    grid: Optional[Sequence[float]] = None,
    bounds: Optional[tuple[float, float]] = None,
    tol: float = 0.01,
    max_iter: int = 15,
    patience: Optional[int] = 3,
    extend: bool = True,
    max_evals: int = 60,
    random_seed: int = 0,
    lines: Any = None,
) -> SearchResult:
    """Choose ``method``'s scale (``lambda`` / ``alpha``) maximising ``score_fn(state_dict)``.

    ``score_fn`` gets a full state dict (base + merged tensors; the same buffers are reused
    between calls, so copy what you keep) and returns a number to maximise — e.g. mean
    normalised validation accuracy.  ``strategy``: ``auto`` (the method's own: golden section
    for ESM, the papers' grid otherwise), ``grid``, ``golden`` or ``coarse`` (see the module).  Returns the best point, the
    whole curve and the merged state at the best scale.

    ``lines`` (``True``, or ``{"alpha": a}``): search LiNeS' ``beta`` instead, on the method's update at its
    scale (1 unless ``parameters`` sets it), LiNeS' ``alpha`` auto (or ``a``); the default strategy is then
    the authors' grid 0.1 .. 1.0 (continued past 1.0 while the best point is the edge).
    """
    m = get_method(method)
    if m.scale_param is None:
        raise ConfigError(f"{method} has no global scale to search")
    params = dict(parameters or {})
    kw = dict(stats=stats, random_seed=random_seed)
    lines_alpha = None
    if lines is not None and lines is not False:
        path, lines_alpha = _lines_path(method, base, models, params, model_parameters, lines, kw)
        spec = {"grid": LAMBDA_GRID}
    else:
        path = affine_path(method, base, models, params, model_parameters, **kw)
        spec = m.search or {}
    if strategy == "auto":
        strategy = "golden" if "bounds" in spec and grid is None else "grid"
    if strategy == "grid":
        g = list(grid or spec.get("grid") or [round(0.1 * i, 2) for i in range(1, 11)])
        curve = _grid_search(path, score_fn, g, patience, extend, max_evals)
    elif strategy == "golden":
        if bounds is None:
            b = spec.get("bounds", (0.0, 2.0))
            bounds = b(m.bind(params, [None] * len(models))) if callable(b) else b
        curve = _golden_search(path, score_fn, tuple(bounds), tol, max_iter, extend)
    elif strategy == "coarse":
        if grid is not None:
            top = max(grid)
        elif "grid" in spec:
            top = max(spec["grid"])
        else:
            b = bounds or spec.get("bounds", (0.0, 2.0))
            top = (b(m.bind(params, [None] * len(models))) if callable(b) else b)[1]
        coarse = [round(top * i / 6, 6) for i in range(1, 7)]
        curve = _grid_search(path, score_fn, coarse, 1, extend, max_evals)
        best = max(curve, key=lambda x: (curve[x], -x))
        for a in (best - top / 12, best + top / 12):
            a = round(a, 6)
            if a > 0 and a not in curve and len(curve) < max_evals:
                curve[a] = float(score_fn(path(a)))
    else:
        raise ConfigError(f"unknown search strategy {strategy!r}; use auto, grid, golden or coarse")
    best = max(curve, key=lambda a: (curve[a], -a))
    return SearchResult(method, "beta" if lines_alpha is not None else m.scale_param, best, curve[best],
                        dict(sorted(curve.items())), strategy, path(best, copy=True), path, list(curve),
                        lines_alpha)


def _lines_path(method: str, base, models, params: dict, model_parameters, lines: Any,
                kw: dict) -> tuple[AffinePath, float]:
    """LiNeS' path over beta: θ(β) = θ_0 + α·τ + β·(ℓ/(L−1))·τ, τ the method's update; and α."""
    from submerge.methods import lines as L

    m = get_method(method)
    spec = {} if lines is True else dict(lines.__dict__ if isinstance(lines, L.Lines) else lines)
    alpha = L.Lines.of({"beta": 0.0, **{k: v for k, v in spec.items() if k != "beta"}}).alpha
    merged = merge_state_dicts_many(method, base, models, [{m.scale_param: 1.0, **params}], model_parameters,
                                    **kw)[0]
    names = [k for k, v in merged.items() if v.is_floating_point()]
    depths, _ = L.block_depths(names)
    if alpha is None:
        alpha = L.alpha_from_states(base, models, merged, names)
    at0, at1 = dict(merged), dict(merged)
    for n in names:
        b = base[n].float()
        update = merged[n].float() - b
        at0[n] = b + alpha * update
        at1[n] = at0[n] + (depths[n] or 0.0) * update
    path = AffinePath(at0, at1)
    path.dtypes = {n: merged[n].dtype for n in names}  # outputs in the inputs' dtype, the path in float32
    return path, alpha


# The λ grid of task arithmetic and its relatives (Ilharco et al.; Yadav et al.): 0.1 .. 1.0.
LAMBDA_GRID = [round(0.1 * i, 2) for i in range(1, 11)]


def auto_search_kwargs(method: Any, lambda_grid: Optional[Sequence[float]] = None) -> dict:
    """How ``alpha: auto`` (``submerge tune``) and the benchmark's full search choose a method's scale:
    a ``lambda`` method on the whole λ grid (0.1..1.0, every point, continued past 1.0 while the best point is
    the edge); an ``alpha`` method by its own strategy (the papers' grid with patience 3, ESM's golden
    section)."""
    m = get_method(method) if isinstance(method, str) else method
    if m.scale_param == "lambda":
        return {"grid": list(lambda_grid or LAMBDA_GRID), "patience": None}
    return {"patience": 3}
