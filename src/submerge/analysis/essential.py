"""ESM's view of a family, from the calibration statistics ``submerge calibrate`` writes.

For each linear layer whose role ESM decomposes (q, k, v, attention out, MLP in/out) and each task with
statistics for it, the feature shift ``ΔO = X ΔWᵀ`` of the task's update on its own inputs has the PCA
``ΔW G ΔWᵀ / (n − 1)`` (:func:`submerge.stats.gram.essential_subspace`).  Reported per layer:

* the essential rank ``k90_essential``: how many feature-shift directions hold 90% of its energy, beside the
  weight-SVD rank ``k90_weight`` holding 90% of ``‖ΔW‖²`` — the data concentrate an update when the first
  is well below the second;
* the overlap of two tasks' top-k essential subspaces ``‖E_iᵀ E_j‖²_F / k`` beside the overlap of their top-k
  left singular subspaces (the same output space, the same k = TSV-M's ⌊min(m, n) / T⌋) — when the two
  agree, the data add nothing a weight-only method does not already see.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from submerge.analysis.weights import energy_rank, subspace_overlap
from submerge.stats.gram import essential_subspace


class EssentialAnalyzer:
    def __init__(self, tasks: Sequence[str], stats: Sequence[Any], roles: Optional[set[str]] = None):
        self.tasks = list(tasks)
        self.stats = list(stats)
        self.roles = roles or {"q", "k", "v", "attn_out", "mlp_in", "mlp_out"}
        self.layers: list[dict] = []
        self.missing: list[str] = []

    def add(self, name: str, role: Optional[str], block: Optional[int], base: torch.Tensor,
            experts: Sequence[torch.Tensor], weight_vectors: Optional[tuple] = None,
            weight_svals: Optional[Sequence[torch.Tensor]] = None) -> Optional[dict]:
        """One weight: ``weight_vectors`` are the tasks' top-k (left, right) singular vectors of the stored ``ΔW``
        (from the data-free pass); the output side is the left one of an ``out_in`` weight, the right of ``in_out``."""
        if role not in self.roles or base.dim() != 2:
            return None
        per = [s.lookup(name) if s is not None else None for s in self.stats]
        if any(p is None for p in per):
            self.missing.append(name)
            return None
        weight_out = None
        if weight_vectors is not None:
            weight_out = weight_vectors[1] if per[0].layout == "in_out" else weight_vectors[0]
        t = len(experts)
        es, k90e, k90w, energy = [], [], [], []
        k = weight_out[0].shape[1] if weight_out else max(1, min(base.shape) // t)
        for ti, (w, st) in enumerate(zip(experts, per)):
            delta = st.weight_as_out_in(w.double() - base.double())
            d_out = delta.shape[0]
            e, lam = essential_subspace(delta, st.gram, st.count, d_out)
            es.append(e[:, :k])
            k90e.append(energy_rank(lam))
            s = weight_svals[ti] if weight_svals is not None else torch.linalg.svdvals(delta)
            k90w.append(energy_rank(s.pow(2)))
            c = torch.cumsum(lam, 0) / lam.sum().clamp(min=1e-300)
            energy.append([float(c[min(i, len(c) - 1)]) for i in (0, 3, 15, 63, 255) if len(c)])
        off = [(i, j) for i in range(t) for j in range(t) if i < j]
        ess = [subspace_overlap(es[i], es[j]) for i, j in off]
        wl = None
        if weight_out is not None:
            wl = [subspace_overlap(weight_out[i].double(), weight_out[j].double()) for i, j in off]
        rec = {"name": name, "role": role, "block": block, "k": k,
               "k90_essential": k90e, "k90_weight": k90w,
               "energy_at_1_4_16_64_256": energy,
               "overlap_essential": _mean(ess), "overlap_weight": _mean(wl) if wl is not None else None,
               "chance": k / es[0].shape[0]}
        self.layers.append(rec)
        return rec

    def summary(self) -> dict:
        if not self.layers:
            return {"layers": [], "missing": self.missing[:20], "n_missing": len(self.missing)}
        t = len(self.tasks)
        k90e = [sum(r["k90_essential"][i] for r in self.layers) / len(self.layers) for i in range(t)]
        k90w = [sum(r["k90_weight"][i] for r in self.layers) / len(self.layers) for i in range(t)]
        both = [r for r in self.layers if r["overlap_weight"] is not None]
        by_role: dict[str, dict] = {}
        for r in self.layers:
            d = by_role.setdefault(r["role"], {"n": 0, "k90_essential": 0.0, "k90_weight": 0.0,
                                               "overlap_essential": 0.0, "overlap_weight": 0.0, "nw": 0})
            d["n"] += 1
            d["k90_essential"] += sum(r["k90_essential"]) / t
            d["k90_weight"] += sum(r["k90_weight"]) / t
            d["overlap_essential"] += r["overlap_essential"]
            if r["overlap_weight"] is not None:
                d["overlap_weight"] += r["overlap_weight"]
                d["nw"] += 1
        for d in by_role.values():
            n, nw = d.pop("n"), d.pop("nw")
            d["layers"] = n
            for key in ("k90_essential", "k90_weight", "overlap_essential"):
                d[key] /= n
            d["overlap_weight"] = d["overlap_weight"] / nw if nw else None
        return {
            "layers": self.layers,
            "mean_k90_essential": k90e, "mean_k90_weight": k90w,
            "mean_overlap_essential": _mean([r["overlap_essential"] for r in self.layers]),
            "mean_overlap_weight": _mean([r["overlap_weight"] for r in both]) if both else None,
            "overlap_correlation": _corr([r["overlap_essential"] for r in both], [r["overlap_weight"] for r in both]),
            "by_role": by_role, "missing": self.missing[:20], "n_missing": len(self.missing),
        }


def _mean(x: Optional[Sequence[float]]) -> float:
    x = [v for v in (x or []) if v is not None and not math.isnan(v)]
    return sum(x) / len(x) if x else float("nan")


def _corr(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    if len(a) < 3:
        return None
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else None
