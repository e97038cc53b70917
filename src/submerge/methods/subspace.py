"""The data-free subspace family: TSV-M, Iso-C, Iso-CTS (and the shared SVD kernels).

Every method here works per 2-D weight matrix on the task updates ΔW_t = W_t − W_0:
it builds a low-rank / re-spectrum merged update ΔW and returns W_0 + α·ΔW.
Tensors that are not matrices (biases, norms) and, by default, embedding tables get
the mean of the task vectors (also scaled by α), as the TSV and Iso code do for
non-2-D parameters.  Every SVD is an exact float64 ``torch.linalg.svd``: TSV-M keeps
k = ⌊min(m, n)/T⌋ directions per task, so the stacked factors are square (T·k = min(m, n))
and their polar factors depend on the whole spectrum, tail included.  A randomized SVD
(``torch.svd_lowrank``, the switch this module used for matrices ≥ 2048 with T ≥ 8) changed
the merged weights by 26–62% (relative Frobenius) and was removed; on a GPU the exact SVD of a
4096² matrix takes well under a second.

The Gram route.  Two kernels take a float64 ``eigh`` of the small Gram matrix instead of an SVD, but only
where a bound says the result is the SVD's to about 1e-12 relative; anywhere else they take the SVD:

- :func:`polar` of a tall ``x`` (``m ≥ r``): ``P = x (xᵀx)^{-1/2}`` with singular values ``sqrt(eig(xᵀx))``.
  The error grows like ``eps · κ(x)²``, so the route is taken when ``λ_min ≥ 1e-4 · λ_max`` (``κ ≤ 100``).
- :func:`truncated_svd`: the top ``k`` eigenpairs of ``x xᵀ`` (or ``xᵀx``, the smaller), the other factor
  ``xᵀu / σ``.  The eigenvectors err by about ``eps · σ₁² / gap``, so the route is taken when
  ``σ_k² ≥ 1e-6 · σ₁²`` and the gap at the cut is ``σ_k² − σ_{k+1}² ≥ 1e-6 · σ₁²``.  With repeated singular
  values at the cut the top-k subspace is not unique, so the SVD decides as it did before.

Inside the top k, a repeated singular value leaves its vectors free up to a rotation. Every merge here is
invariant to that rotation: ``polar(A Q) = polar(A) Q``, and ``S`` is constant on the block.
``tests/test_subspace_fast.py`` compares every merge with the SVD-only path on flat, decaying, repeated,
rank-deficient and shared-direction spectra.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from submerge.methods.registry import Param, TensorContext, register_method

_EMBED_RE = re.compile(r"(embed|wte|wpe|lm_head|position|token_type|shared\.weight|cls_token|pos_emb)", re.I)


def is_embedding(name: str) -> bool:
    """Embedding tables (and tied output heads): merged as plain tensors unless asked otherwise."""
    return bool(_EMBED_RE.search(name))


POLAR_MIN_RATIO = 1e-4   # λ_min / λ_max of xᵀx for polar's Gram route (κ(x) ≤ 100)
TOPK_MIN_RATIO = 1e-6    # σ_k² / σ₁² for truncated_svd's Gram route
TOPK_MIN_GAP = 1e-6      # (σ_k² − σ_{k+1}²) / σ₁² at the cut
ROUTES = {"gram": 0, "svd": 0}  # how often each route ran (diagnostics and tests)


def truncated_svd(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets ``(U [m,k], S [k], Vh [k,n])`` of ``x``, in ``x``'s dtype: the float64
    Gram route where its bound holds, else the exact float64 SVD (module docstring; there is no randomized
    path)."""
    m, n = x.shape
    k = max(0, min(k, m, n))
    x64 = x.double()
    if k > 0:
        left = m <= n
        w, q = torch.linalg.eigh(x64 @ x64.T if left else x64.T @ x64)
        w, q = w.flip(0), q.flip(1)
        top = float(w[0])
        cut_ok = k == len(w) or float(w[k - 1] - w[k]) >= TOPK_MIN_GAP * top
        if top > 0 and float(w[k - 1]) >= TOPK_MIN_RATIO * top and cut_ok:
            ROUTES["gram"] += 1
            s = w[:k].sqrt()
            if left:
                u = q[:, :k]
                vh = (u.T @ x64) / s[:, None]
            else:
                vh = q[:, :k].T
                u = (x64 @ vh.T) / s
            return u.to(x.dtype), s.to(x.dtype), vh.to(x.dtype)
    ROUTES["svd"] += 1
    u, s, vh = torch.linalg.svd(x64, full_matrices=False)
    return u[:, :k].to(x.dtype), s[:k].to(x.dtype), vh[:k].to(x.dtype)


def polar(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The orthogonal polar factor ``U Vᵀ`` of ``x = U S Vᵀ`` (the closest matrix with orthonormal
    columns/rows, Procrustes) and the singular values ``S``, descending: the float64 Gram route where
    ``x`` is well conditioned, else the float64 SVD (module docstring)."""
    x64 = x.double()
    tall = x64.shape[0] >= x64.shape[1]
    a = x64 if tall else x64.T
    w, q = torch.linalg.eigh(a.T @ a)
    if float(w[-1]) > 0 and float(w[0]) >= POLAR_MIN_RATIO * float(w[-1]):
        ROUTES["gram"] += 1
        p = a @ ((q * w.rsqrt()) @ q.T)
        return (p if tall else p.T).to(x.dtype), w.flip(0).sqrt().to(x.dtype)
    ROUTES["svd"] += 1
    u, s, vh = torch.linalg.svd(x64, full_matrices=False)
    return (u @ vh).to(x.dtype), s.to(x.dtype)


def task_vectors(ctx: TensorContext) -> list[torch.Tensor]:
    base = ctx.base
    return [t.sub_(base) for t in ctx.tensors]


def mean_of(deltas: list[torch.Tensor]) -> torch.Tensor:
    out = deltas[0].clone()
    for d in deltas[1:]:
        out.add_(d)
    return out.div_(len(deltas))


def is_matrix(ctx_name: str, x: torch.Tensor, embeddings: str = "mean") -> bool:
    return x.dim() == 2 and min(x.shape) > 1 and (embeddings == "svd" or not is_embedding(ctx_name))


def tsv_merge(deltas: list[torch.Tensor], rank: Optional[int] = None) -> torch.Tensor:
    """TSV-M of one matrix: per task top-k SVD (k = ⌊min(m, n)/T⌋), concatenate, replace the stacked
    U and V by their polar factors, keep the singular values: ΔW = U⊥ diag(S_cat) V⊥ᵀ.

    With fewer dimensions than tasks (min(m, n) < T) k is 0 and the merged update is zero: the
    matrix keeps the base's weights.  That is what the official code (``int(s.shape[0] / T)``
    triplets per task) and FusionBench compute; a per-task rank of 1 would stack T > min(m, n)
    directions, which cannot be orthogonal, so there is no TSV-M answer to copy for it."""
    m, n = deltas[0].shape
    T = len(deltas)
    k = rank if rank is not None else min(m, n) // T
    if k == 0:
        return torch.zeros_like(deltas[0])
    us, ss, vs = zip(*(truncated_svd(d, k) for d in deltas))
    u_cat, s_cat, vh_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 0)
    u_o, _ = polar(u_cat)
    vh_o, _ = polar(vh_cat)
    return (u_o * s_cat) @ vh_o


def iso_c_merge(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Iso-C of one matrix: SVD of the summed update, all singular values replaced by their mean."""
    total = deltas[0].clone()
    for d in deltas[1:]:
        total.add_(d)
    u, s, vh = torch.linalg.svd(total.double(), full_matrices=False)
    return (s.mean() * (u @ vh)).to(total.dtype)


def iso_cts_split(min_dim: int, T: int, common_fraction: float) -> tuple[int, int]:
    """(k_common, k_per_task) as the Iso-CTS code: the task-specific total is rounded to a multiple
    of T and the common space takes the rest.

    Where that rounding goes up past ``min_dim`` (e.g. min_dim 3, T = 2, fraction 0: 2 per task)
    the official code's common size is negative and its slice ``[:, :-1]`` silently keeps
    ``min_dim − 1`` common directions; here the per-task size is rounded down instead, so the
    common space is empty, never negative."""
    k_c = int(min_dim * common_fraction)
    per_task = round((min_dim - k_c) / T)
    if per_task * T > min_dim:
        per_task = min_dim // T
    return min_dim - per_task * T, per_task


def iso_cts_merge(deltas: list[torch.Tensor], common_fraction: float = 0.8) -> torch.Tensor:
    """Iso-CTS of one matrix: the top common directions of the summed update plus, per task, the top
    directions of its update with the common space projected out; both stacked U and V are replaced
    by their polar factors and every singular value by their mean."""
    m, n = deltas[0].shape
    T = len(deltas)
    total = deltas[0].clone()
    for d in deltas[1:]:
        total.add_(d)
    k_c, k_t = iso_cts_split(min(m, n), T, common_fraction)
    u, s, vh = torch.linalg.svd(total.double(), full_matrices=False)
    u_c, s_c, vh_c = u[:, :k_c], s[:k_c], vh[:k_c]
    us, ss, vs = [u_c], [s_c], [vh_c]
    if k_t > 0:
        for d in deltas:
            d64 = d.double()
            d_orth = d64 - u_c @ (u_c.T @ d64)
            ut, st, vht = truncated_svd(d_orth, k_t)
            us.append(ut)
            ss.append(st)
            vs.append(vht)
    u_o, _ = polar(torch.cat(us, 1))
    vh_o, _ = polar(torch.cat(vs, 0))
    s_mean = torch.cat(ss).mean()
    return (s_mean * (u_o @ vh_o)).to(deltas[0].dtype)


_ALPHA_GRID = [round(0.1 * i, 2) for i in range(1, 31)]  # TSV / Iso papers: linspace(0, 3, 31)[1:]
_EMBEDDINGS = Param("embeddings", str, "mean", choices=("mean", "svd"),
                    help="embedding tables (by name): mean of task vectors (default) or the matrix rule")


def _subspace_method(ctx: TensorContext, rule, alpha: float, embeddings: str) -> torch.Tensor:
    if alpha == 0:
        return ctx.base
    deltas = task_vectors(ctx)
    if is_matrix(ctx.name, deltas[0], embeddings):
        merged = rule(deltas)
    else:
        merged = mean_of(deltas)
    return ctx.base.add_(merged, alpha=alpha)


@register_method(
    name="tsv",
    pretty_name="TSV-M (Task Singular Vectors: merge)",
    paper="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025",
    url="https://arxiv.org/abs/2412.00081",
    variant="TSV-M as the official code (compute_and_sum_svd_mem_reduction): per 2-D matrix and task, SVD of "
            "the update, keep k = floor(min(m,n)/T) triplets; concatenate; replace the stacked U and V by their "
            "polar factors (SVD, not the eigh whitening of TSVM_2); dW = U_o diag(S_cat) V_o^T. Other tensors "
            "(and embedding tables unless embeddings=svd): mean of the task vectors. theta = base + alpha*dW. "
            "Default alpha=1; the paper tunes it on linspace(0,3,31)[1:].",
    params=[Param("alpha", float, 1.0, help="scale of the merged update"), _EMBEDDINGS],
    needs_base=True,
    scale_param="alpha",
    search={"grid": _ALPHA_GRID},
)
def tsv(ctx: TensorContext, *, alpha: float, embeddings: str) -> torch.Tensor:
    return _subspace_method(ctx, tsv_merge, alpha, embeddings)


@register_method(
    name="iso_c",
    pretty_name="Iso-C (isotropic merging in the common subspace)",
    paper="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
          "Subspaces, ICML 2025",
    url="https://arxiv.org/abs/2502.04959",
    variant="Iso-C as the official code (iso.py::iso_c): per 2-D matrix, SVD of the summed update "
            "U S V^T; dW = mean(S) U V^T (flat spectrum). Other tensors: mean of task vectors. theta = base + "
            "alpha*dW. Default alpha=1; the paper tunes it on linspace(0,3,31)[1:].",
    params=[Param("alpha", float, 1.0, help="scale of the merged update"), _EMBEDDINGS],
    needs_base=True,
    scale_param="alpha",
    search={"grid": _ALPHA_GRID},
)
def iso_c(ctx: TensorContext, *, alpha: float, embeddings: str) -> torch.Tensor:
    return _subspace_method(ctx, iso_c_merge, alpha, embeddings)


@register_method(
    name="iso_cts",
    pretty_name="Iso-CTS (isotropic merging, common + task-specific subspaces)",
    paper="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
          "Subspaces, ICML 2025",
    url="https://arxiv.org/abs/2502.04959",
    variant="Iso-CTS as the official code (iso.py::iso_cts): common space = top k_c directions of the summed "
            "update (k_c ~ common_space_fraction*min(m,n), adjusted so the rest divides by T); per task, top "
            "(min(m,n)-k_c)/T directions of its update with the common space projected out; stacked U and V "
            "replaced by polar factors, all singular values by their mean. Other tensors: mean of task vectors. "
            "Defaults: common_space_fraction=0.8, alpha=1 (tuned on linspace(0,3,31)[1:] in the paper).",
    params=[Param("alpha", float, 1.0, help="scale of the merged update"),
            Param("common_space_fraction", float, 0.8, low=0.0, high=1.0,
                  help="fraction of the rank given to the common subspace"), _EMBEDDINGS],
    needs_base=True,
    scale_param="alpha",
    search={"grid": _ALPHA_GRID},
)
def iso_cts(ctx: TensorContext, *, alpha: float, common_space_fraction: float, embeddings: str) -> torch.Tensor:
    return _subspace_method(ctx, lambda d: iso_cts_merge(d, common_space_fraction), alpha, embeddings)
