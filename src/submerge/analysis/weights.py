"""Data-free measurements of a family of fine-tunes, one tensor at a time.

For every floating tensor the base and the experts share, the task vectors ``τ_t = θ_t − θ_base`` give:

* norms ``‖τ_t‖`` (per tensor, summed per block and per layer family);
* the Gram matrix ``⟨τ_i, τ_j⟩`` — pairwise cosine of the whole model, per block and per family;
* sign conflicts: for each pair, the share of entries where both are nonzero and their signs differ,
  and overall (TIES' view) the share of entries, among those two or more tasks touch, where some task
  disagrees with the elected sign ``sign(Σ_t τ_t)``;
* overlap of top-k masks: per task the ``topk`` share of entries of largest ``|τ_t|`` in the tensor
  (a ``torch.kthvalue`` threshold, as TIES trims), and per pair the intersection over union;
* spectra of the 2-D weights (embedding tables excepted): each task's effective rank (Roy & Vetterli 2007:
  ``exp(H(σ / Σσ))``), the rank holding 90% of ``‖τ_t‖²``, and the subspace overlap of two tasks' top-k
  left (output) and right (input) singular subspaces, ``‖U_iᵀ U_j‖²_F / k`` with TSV-M's per-task rank
  ``k = ⌊min(m, n) / T⌋`` — 1 when the subspaces coincide, ``k / m`` expected for random ones (reported
  beside it as ``chance``).

Everything is accumulated in float64 from float32 tensors; only one tensor of each model is in memory at
a time.  Matrices with more than ``svd_max`` entries get a ``torch.svd_lowrank`` spectrum of ``q`` =
``lowrank_q`` directions (their effective rank and k90 are then over those directions: a lower bound,
flagged ``"lowrank": true``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from submerge.layers import family_of, layer_role, layer_structure, parse_role_patterns


def effective_rank(s: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank ``exp(H(p))``, ``p = σ / Σσ`` (0 for a zero matrix)."""
    s = s.double().clamp(min=0)
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def energy_rank(values: torch.Tensor, share: float = 0.9) -> int:
    """How many of the (descending) ``values`` — energies, σ² or PCA eigenvalues — hold ``share`` of their sum."""
    v = values.double().clamp(min=0)
    total = float(v.sum())
    if total <= 0:
        return 0
    c = torch.cumsum(v, 0) / total
    return int(torch.searchsorted(c, torch.tensor(share - 1e-12, dtype=c.dtype)).item()) + 1


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖Aᵀ B‖²_F / k`` for orthonormal ``A, B [d, k]``: 1 for the same subspace, 0 for orthogonal ones."""
    k = min(a.shape[1], b.shape[1])
    if k == 0:
        return float("nan")
    return float((a[:, :k].T.double() @ b[:, :k].double()).pow(2).sum() / k)


@dataclass
class TensorRecord:
    """What one tensor contributes (kept per tensor in ``analysis.json``)."""

    name: str
    shape: list[int]
    block: Optional[int]
    family: str
    role: Optional[str]
    norms: list[float]
    gram: list[list[float]]
    sign_disagree: list[list[int]]
    both_nonzero: list[list[int]]
    conflict_entries: int
    contested_entries: int
    mask_inter: list[list[int]]
    mask_union: list[list[int]]
    spectrum: Optional[dict] = None
    touched: Optional[list[bool]] = None  # per task: its task vector is not negligible here (see NEGLIGIBLE)


NEGLIGIBLE = 1e-6  # a task vector with ||tau|| <= this * ||base|| (or exactly zero) left the tensor untouched


class _Deltas:
    """``experts[i] − base`` as float32 matrices, made when indexed (one at a time: bounded memory)."""

    def __init__(self, base: torch.Tensor, experts: Sequence[torch.Tensor]):
        self.base, self.experts = base, experts

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, i: int) -> torch.Tensor:
        if i >= len(self.experts):
            raise IndexError(i)
        return self.experts[i].float() - self.base.float()


def _spectrum(ds: Sequence[torch.Tensor], svd_max: int, lowrank_q: int) -> dict:
    """Per task: singular values and the top-k left/right singular vectors of ``ds [T, m, n]``.

    Exact path: the eigendecomposition of the smaller Gram matrix (``d dᵀ`` or ``dᵀ d``, float64) gives σ² and
    one side's vectors; the other side's top k follow as ``dᵀ u / σ`` (several times faster than an SVD)."""
    t, (m, n) = len(ds), tuple(ds[0].shape)
    k = max(1, min(m, n) // t)
    lowrank = m * n > svd_max
    svals, us, vs = [], [], []
    for d in ds:
        if lowrank:
            u, s, v = torch.svd_lowrank(d.float(), q=min(lowrank_q, m, n), niter=4)
            u, s, v = u.double(), s.double(), v.double()
        else:
            x = d.double()
            small_left = m <= n
            lam, vec = torch.linalg.eigh(x @ x.T if small_left else x.T @ x)
            lam, vec = lam.flip(0).clamp(min=0), vec.flip(1)
            s = lam.sqrt()
            top, sk = vec[:, :k], s[:k]
            other = (x.T @ top if small_left else x @ top) / sk.clamp(min=1e-300)
            other = torch.where(sk > 0, other, torch.zeros_like(other))
            u, v = (top, other) if small_left else (other, top)
        svals.append(s)
        us.append(u[:, :k])
        vs.append(v[:, :k])
    return {"k": k, "lowrank": lowrank, "s": svals, "u": us, "v": vs}


class WeightAnalyzer:
    """Accumulates :class:`TensorRecord` over streamed tensors (``add``), then summarises (``summary``)."""

    def __init__(self, tasks: Sequence[str], *, topk: float = 0.2, spectra: bool = True,
                 svd_max: int = 16_000_000, lowrank_q: int = 256, role_patterns: str = "",
                 chunk: int = 1 << 20):
        self.tasks = list(tasks)
        self.topk = topk
        self.spectra = spectra
        self.svd_max = svd_max
        self.lowrank_q = lowrank_q
        self.chunk = chunk
        self.rules = parse_role_patterns(role_patterns)
        self.records: list[TensorRecord] = []
        self._blocks: dict[str, Optional[int]] = {}
        # the last 2-D tensor's top-k left and right singular vectors per task (ESM's view compares with them)
        self.last_vectors: Optional[tuple[list[torch.Tensor], list[torch.Tensor]]] = None
        self.last_svals: Optional[list[torch.Tensor]] = None

    def set_names(self, names: Iterable[str]) -> None:
        """All tensor names, so that block indices come from the model's own block stack."""
        _, layers = layer_structure(list(names))
        self._blocks = {n: i for n, (i, _) in layers.items()}

    def add(self, name: str, base: torch.Tensor, experts: Sequence[torch.Tensor], *, embedding: bool = False) -> TensorRecord:
        t = len(experts)
        bflat = base.reshape(-1)
        eflat = [e.reshape(-1) for e in experts]
        n = bflat.numel()
        k = min(n, max(1, int(round(self.topk * n))))
        thr = torch.stack([torch.kthvalue((e.float() - bflat.float()).abs_(), n - k + 1).values
                           for e in eflat]).unsqueeze(1).double()
        zero = torch.zeros(t, t, dtype=torch.float64)
        gram, both, agree_minus, inter = zero.clone(), zero.clone(), zero.clone(), zero.clone()
        conflict = contested = 0
        for s0 in range(0, n, self.chunk):  # bounded temporaries: [T, chunk] at a time, never [T, n]
            b = bflat[s0:s0 + self.chunk].double()
            c64 = torch.stack([e[s0:s0 + self.chunk].double() for e in eflat]).sub_(b)
            c32 = c64.float().double()  # the float32 delta the thresholds were taken on
            gram += c64 @ c64.T
            s = torch.sign(c64)
            nz = s.abs()
            both += nz @ nz.T
            agree_minus += s @ s.T  # (#agree − #disagree) over entries both touch
            m = ((c32.abs() >= thr) & (c32 != 0)).double()
            inter += m @ m.T
            touched = nz.sum(0) >= 2
            elected = torch.sign(c64.sum(0))
            conflict += int(((s != 0) & (s != elected) & touched).any(0).sum())
            contested += int(touched.sum())
            del b, c64, c32, s, nz, m
        disagree = ((both - agree_minus) / 2).round()
        sizes = inter.diagonal()
        union = sizes[:, None] + sizes[None, :] - inter
        self.last_vectors = None
        role = layer_role(name, self.rules)
        bnorm = float(bflat.double().norm())
        norms = gram.diagonal().clamp(min=0).sqrt()
        touched = [bool(x > 0 and x > NEGLIGIBLE * bnorm) for x in norms.tolist()]
        rec = TensorRecord(
            name=name, shape=list(base.shape), block=self._blocks.get(name), family=family_of(name),
            role=role[0] if role else None, norms=[float(x) for x in gram.diagonal().clamp(min=0).sqrt()],
            gram=gram.tolist(), sign_disagree=disagree.long().tolist(), both_nonzero=both.round().long().tolist(),
            conflict_entries=conflict, contested_entries=contested,
            mask_inter=inter.round().long().tolist(), mask_union=union.round().long().tolist(), touched=touched)
        if self.spectra and base.dim() == 2 and min(base.shape) > 1 and not embedding and any(touched):
            sp = _spectrum(_Deltas(base, experts), self.svd_max, self.lowrank_q)
            k = sp["k"]

            def overlap(vs: list, i: int, j: int) -> float:
                # an untouched task's "subspace" is an arbitrary basis of a zero matrix: no overlap to measure
                return subspace_overlap(vs[i], vs[j]) if touched[i] and touched[j] else float("nan")

            left = [[overlap(sp["u"], i, j) for j in range(t)] for i in range(t)]
            right = [[overlap(sp["v"], i, j) for j in range(t)] for i in range(t)]
            rec.spectrum = {
                "k": k, "lowrank": sp["lowrank"],
                "effective_rank": [effective_rank(x) for x in sp["s"]],
                "k90": [energy_rank(x.pow(2)) for x in sp["s"]],
                "overlap_left": left, "overlap_right": right,
                "chance_left": k / base.shape[0], "chance_right": k / base.shape[1],
            }
            self.last_vectors = (sp["u"], sp["v"])
            self.last_svals = sp["s"]
        self.records.append(rec)
        return rec

    # ------------------------------------------------------------------ summaries
    def summary(self) -> dict:
        t = len(self.tasks)
        recs = self.records

        def cos_of(g: torch.Tensor) -> list[list[float]]:
            d = g.diagonal().clamp(min=0).sqrt()
            den = d[:, None] * d[None, :]
            return torch.where(den > 0, g / den.clamp(min=1e-300), torch.full_like(g, float("nan"))).tolist()

        def ratio(num: torch.Tensor, den: torch.Tensor) -> list[list[float]]:
            return torch.where(den > 0, num / den.clamp(min=1), torch.full_like(num, float("nan"))).tolist()

        zero = torch.zeros(t, t, dtype=torch.float64)
        g_all, dis, both, inter, union = zero.clone(), zero.clone(), zero.clone(), zero.clone(), zero.clone()
        by_family: dict[str, torch.Tensor] = {}
        by_block: dict[int, torch.Tensor] = {}
        norms_block: dict[int, torch.Tensor] = {}
        conflict = contested = 0
        for r in recs:
            g = torch.tensor(r.gram, dtype=torch.float64)
            g_all += g
            dis += torch.tensor(r.sign_disagree, dtype=torch.float64)
            both += torch.tensor(r.both_nonzero, dtype=torch.float64)
            inter += torch.tensor(r.mask_inter, dtype=torch.float64)
            union += torch.tensor(r.mask_union, dtype=torch.float64)
            conflict += r.conflict_entries
            contested += r.contested_entries
            by_family[r.family] = by_family.get(r.family, zero) + g
            if r.block is not None:
                by_block[r.block] = by_block.get(r.block, zero) + g
                norms_block[r.block] = norms_block.get(r.block, torch.zeros(t, dtype=torch.float64)) + g.diagonal()
        off = ~torch.eye(t, dtype=torch.bool)

        def mean_off(m: list[list[float]]) -> float:
            x = torch.tensor(m, dtype=torch.float64)[off]
            x = x[~torch.isnan(x)]
            return float(x.mean()) if x.numel() else float("nan")

        cos = cos_of(g_all)
        families = {f: cos_of(g) for f, g in sorted(by_family.items())}
        blocks = {b: cos_of(by_block[b]) for b in sorted(by_block)}
        spectra = [r for r in recs if r.spectrum is not None]
        per_layer = []
        for r in spectra:
            sp = r.spectrum
            per_layer.append({
                "name": r.name, "block": r.block, "family": r.family, "role": r.role, "k": sp["k"],
                "lowrank": sp["lowrank"], "effective_rank": sp["effective_rank"], "k90": sp["k90"],
                "overlap_left": mean_off(sp["overlap_left"]), "overlap_right": mean_off(sp["overlap_right"]),
                "chance_left": sp["chance_left"], "chance_right": sp["chance_right"],
                "mean_cosine": mean_off(cos_of(torch.tensor(r.gram, dtype=torch.float64)))})
        return {
            "tasks": self.tasks,
            "tensors": len(recs),
            "norm": [math.sqrt(max(x, 0.0)) for x in g_all.diagonal().tolist()],
            "cosine": cos,
            "mean_cosine": mean_off(cos),
            "sign_conflict": ratio(dis, both),
            "elected_sign_conflict": conflict / contested if contested else float("nan"),
            "topk": self.topk,
            "topk_iou": ratio(inter, union),
            "cosine_by_family": families,
            "mean_cosine_by_family": {f: mean_off(c) for f, c in families.items()},
            "matrix_families": sorted({r.family for r in recs if len(r.shape) == 2}),
            "cosine_by_block": {str(b): c for b, c in blocks.items()},
            "mean_cosine_by_block": {str(b): mean_off(c) for b, c in blocks.items()},
            "norm_by_block": {str(b): [math.sqrt(max(x, 0.0)) for x in v.tolist()] for b, v in sorted(norms_block.items())},
            "spectra": per_layer,
            # tensors no task changed (zero or negligible task vectors): never counted as interference
            "untouched": [r.name for r in recs if r.touched is not None and not any(r.touched)],
        }
