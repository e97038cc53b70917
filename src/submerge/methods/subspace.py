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

Low-rank updates (LoRA experts) make the papers' rules ill-posed.  TSV-M keeps k = ⌊min(m, n)/T⌋ triplets per
task and Iso-C flattens every singular value of the sum; where an update's rank r is below that (a rank-16 LoRA
expert of a 576-wide layer with T = 6 has k = 96), the extra triplets have singular values of rounding noise
(σ₁₇/σ₁ ≈ 5e-7 for the LLM suite's experts, σ₁₆/σ₁ ≈ 0.04–0.1) and vectors the SVD picks arbitrarily from the
null space.  TSV-M's polar factors mix them into the real directions, Iso-C gives them the mean singular value:
on random rank-3 and rank-16 stacks, a 1e-15 relative perturbation of the inputs moves the merged update by
66–132% (TSV-M, Iso-C, Iso-CTS), against 1e-14 on full-rank ones (``tests/test_subspace_rank.py``).  So no two
implementations, and not the same one on two machines, need agree there.  ``rank_tol > 0`` drops the triplets at
most ``rank_tol·‖ΔW‖_F``, which makes the rules well-posed on such updates and leaves full-rank ones unchanged;
the default 0 keeps the papers' (and their code's) behaviour.

Faster paths measured and rejected (issue 32).  A float64 ``eigh`` of the small Gram matrix instead of the
SVD is 3x faster on TSV-M of the quick suite's 8 experts.  But it moves the merged update by up to 1.2e-8
relative, and still by 2.6e-10 when used only where ``σ_k ≥ 0.1 σ₁``, against the SVD path's own 1e-14 under
eps-sized input perturbations.  TSV-M's stacked U is square (T·k = min(m, n)) and ill-conditioned, so its
polar factor amplifies the Gram route's squared-condition errors.  What is kept is exact: the T per-task SVDs
of one matrix run as one batched SVD (:func:`truncated_svds`), which LAPACK still computes per matrix (the same
bits on most shapes; on an AMD EPYC with MKL not where min(m, n) is odd, a rounding-level difference), and a
wide matrix is decomposed as its transpose (:func:`exact_svd`: the same SVD, 1.2–2.6x faster).  Both keep every
merge within 1e-10 of the per-matrix direct path, or within the direct path's own move under 1e-15 input
noise where a spectrum makes that larger (``tests/test_subspace_fast.py``).
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


def exact_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD ``(U, S, Vh)`` of ``x`` (a matrix or a batch of them) in float64, computed on the tall side:
    a wide matrix (rows < columns) is decomposed as its transpose, ``Xᵀ = V S Uᵀ``.  The same decomposition
    (the factors agree to rounding wherever they are unique), and LAPACK's divide and conquer takes 1.2–2.6x
    less time on the transpose of a wide matrix (2 threads: 1024x4096 2.47 s → 1.15 s, 2048x8192 22.5 s →
    8.8 s, 576x1536 0.32 s → 0.23 s; issue 32)."""
    x = x.double()
    if x.shape[-2] < x.shape[-1]:
        v, s, uh = torch.linalg.svd(x.mT, full_matrices=False)
        return uh.mT, s, v.mT
    return torch.linalg.svd(x, full_matrices=False)


def truncated_svd(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets ``(U [m,k], S [k], Vh [k,n])`` of ``x``, in ``x``'s dtype
    (exact float64 SVD; see the module docstring for why there is no randomized or Gram path)."""
    m, n = x.shape
    k = max(0, min(k, m, n))
    u, s, vh = exact_svd(x)
    return u[:, :k].to(x.dtype), s[:k].to(x.dtype), vh[:k].to(x.dtype)


def truncated_svds(xs: list[torch.Tensor], k: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`truncated_svd` of each matrix, those of one shape through one batched SVD: LAPACK runs per
    matrix, so the bits are those of one SVD each, and the batch shares the cores."""
    if len(xs) < 2 or any(x.shape != xs[0].shape for x in xs):
        return [truncated_svd(x, k) for x in xs]
    m, n = xs[0].shape
    k = max(0, min(k, m, n))
    u, s, vh = exact_svd(torch.stack([x.double() for x in xs]))
    return [(u[i, :, :k].to(x.dtype), s[i, :k].to(x.dtype), vh[i, :k].to(x.dtype)) for i, x in enumerate(xs)]


def polar(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The orthogonal polar factor ``U Vᵀ`` of ``x = U S Vᵀ`` (the closest matrix with orthonormal
    columns/rows, Procrustes) and the singular values ``S`` (float64 SVD)."""
    u, s, vh = exact_svd(x)
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


def nonzero_count(s: torch.Tensor, norm: torch.Tensor, rank_tol: float) -> int:
    """How many of the singular values ``s`` (descending) of an update are above ``rank_tol`` times its
    Frobenius norm ``norm``: the rest are numerically zero, directions of its null space that the SVD picks
    arbitrarily (see the module docstring).  ``rank_tol = 0`` keeps them all, as the papers' code does."""
    return len(s) if rank_tol <= 0 else int((s > rank_tol * norm).sum())


def drop_null(triplets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], sources: list[torch.Tensor],
              rank_tol: float) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each ``(U, S, Vh)`` of ``sources[i]`` cut to its triplets above ``rank_tol·‖sources[i]‖_F``."""
    if rank_tol <= 0:
        return triplets
    out = []
    for (u, s, vh), x in zip(triplets, sources):
        j = nonzero_count(s, torch.linalg.matrix_norm(x.double()).to(s.dtype), rank_tol)
        out.append((u[:, :j], s[:j], vh[:j]))
    return out


def tsv_merge(deltas: list[torch.Tensor], rank: Optional[int] = None, rank_tol: float = 0.0) -> torch.Tensor:
    """TSV-M of one matrix: per task top-k SVD (k = ⌊min(m, n)/T⌋), concatenate, replace the stacked
    U and V by their polar factors, keep the singular values: ΔW = U⊥ diag(S_cat) V⊥ᵀ.

    With fewer dimensions than tasks (min(m, n) < T) k is 0 and the merged update is zero: the
    matrix keeps the base's weights.  That is what the official code (``int(s.shape[0] / T)``
    triplets per task) and FusionBench compute; a per-task rank of 1 would stack T > min(m, n)
    directions, which cannot be orthogonal, so there is no TSV-M answer to copy for it.

    ``rank_tol > 0``: each task keeps only its triplets above ``rank_tol·‖ΔW_t‖_F`` (at most k), so an update
    of lower rank than k (a LoRA expert's) contributes its own directions and no arbitrary null-space ones."""
    m, n = deltas[0].shape
    T = len(deltas)
    k = rank if rank is not None else min(m, n) // T
    if k == 0:
        return torch.zeros_like(deltas[0])
    us, ss, vs = zip(*drop_null(truncated_svds(deltas, k), deltas, rank_tol))
    u_cat, s_cat, vh_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 0)
    if u_cat.shape[1] == 0:
        return torch.zeros_like(deltas[0])
    u_o, _ = polar(u_cat)
    vh_o, _ = polar(vh_cat)
    return (u_o * s_cat) @ vh_o


def iso_c_merge(deltas: list[torch.Tensor], rank_tol: float = 0.0) -> torch.Tensor:
    """Iso-C of one matrix: SVD of the summed update, all singular values replaced by their mean.

    ``rank_tol > 0``: only the sum's triplets above ``rank_tol·‖ΣΔW_t‖_F`` are kept and flattened to their
    mean; the official code also gives every null-space direction of a low-rank sum (LoRA experts') that mean."""
    total = deltas[0].clone()
    for d in deltas[1:]:
        total.add_(d)
    u, s, vh = exact_svd(total)
    if rank_tol > 0:
        ((u, s, vh),) = drop_null([(u, s, vh)], [total], rank_tol)
        if len(s) == 0:
            return torch.zeros_like(total)
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


def iso_cts_merge(deltas: list[torch.Tensor], common_fraction: float = 0.8, rank_tol: float = 0.0) -> torch.Tensor:
    """Iso-CTS of one matrix: the top common directions of the summed update plus, per task, the top
    directions of its update with the common space projected out; both stacked U and V are replaced
    by their polar factors and every singular value by their mean.

    ``rank_tol > 0``: the common directions are cut to the sum's triplets above ``rank_tol·‖ΣΔW_t‖_F`` and each
    task's to those above ``rank_tol·‖ΔW_t‖_F`` (its update's norm, not its residual's: a task inside the common
    space leaves a residual of rounding noise, which is dropped)."""
    m, n = deltas[0].shape
    T = len(deltas)
    total = deltas[0].clone()
    for d in deltas[1:]:
        total.add_(d)
    k_c, k_t = iso_cts_split(min(m, n), T, common_fraction)
    u, s, vh = exact_svd(total)
    ((u_c, s_c, vh_c),) = drop_null([(u[:, :k_c], s[:k_c], vh[:k_c])], [total], rank_tol)
    us, ss, vs = [u_c], [s_c], [vh_c]
    if k_t > 0:
        orth = [d.double() - u_c @ (u_c.T @ d.double()) for d in deltas]
        for ut, st, vht in drop_null(truncated_svds(orth, k_t), deltas, rank_tol):  # each task's own norm
            us.append(ut)
            ss.append(st)
            vs.append(vht)
    if sum(x.shape[1] for x in us) == 0:
        return torch.zeros_like(deltas[0])
    u_o, _ = polar(torch.cat(us, 1))
    vh_o, _ = polar(torch.cat(vs, 0))
    s_mean = torch.cat(ss).mean()
    return (s_mean * (u_o @ vh_o)).to(deltas[0].dtype)


_ALPHA_GRID = [round(0.1 * i, 2) for i in range(1, 31)]  # TSV / Iso papers: linspace(0, 3, 31)[1:]
_EMBEDDINGS = Param("embeddings", str, "mean", choices=("mean", "svd"),
                    help="embedding tables (by name): mean of task vectors (default) or the matrix rule")
_RANK_TOL = Param("rank_tol", float, 0.0, low=0.0, high=1.0,
                  help="drop singular directions at most rank_tol x the update's Frobenius norm (numerically zero: "
                       "an arbitrary null-space basis when an update's rank is below the kept rank, as LoRA "
                       "experts'); 0 keeps them all, as the official code (e.g. 1e-4 for LoRA experts)")


def _subspace_method(ctx: TensorContext, rule, alpha: float, embeddings: str) -> torch.Tensor:
    """base + alpha * (``rule(task vectors)`` on the matrices, their mean elsewhere)."""
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
            "Default alpha=1; the paper tunes it on linspace(0,3,31)[1:]. rank_tol > 0 (not in the paper): each "
            "task keeps only its triplets above rank_tol*||dW_t||_F, so low-rank (LoRA) updates add no "
            "arbitrary null-space directions to the polar factors.",
    params=[Param("alpha", float, 1.0, help="scale of the merged update"), _EMBEDDINGS, _RANK_TOL],
    needs_base=True,
    scale_param="alpha",
    search={"grid": _ALPHA_GRID},
)
def tsv(ctx: TensorContext, *, alpha: float, embeddings: str, rank_tol: float) -> torch.Tensor:
    return _subspace_method(ctx, lambda d: tsv_merge(d, rank_tol=rank_tol), alpha, embeddings)


@register_method(
    name="iso_c",
    pretty_name="Iso-C (isotropic merging in the common subspace)",
    paper="Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
          "Subspaces, ICML 2025",
    url="https://arxiv.org/abs/2502.04959",
    variant="Iso-C as the official code (iso.py::iso_c): per 2-D matrix, SVD of the summed update "
            "U S V^T; dW = mean(S) U V^T (flat spectrum). Other tensors: mean of task vectors. theta = base + "
            "alpha*dW. Default alpha=1; the paper tunes it on linspace(0,3,31)[1:]. rank_tol > 0 (not in the "
            "paper): only the sum's triplets above rank_tol*||sum dW_t||_F are flattened and kept.",
    params=[Param("alpha", float, 1.0, help="scale of the merged update"), _EMBEDDINGS, _RANK_TOL],
    needs_base=True,
    scale_param="alpha",
    search={"grid": _ALPHA_GRID},
)
def iso_c(ctx: TensorContext, *, alpha: float, embeddings: str, rank_tol: float) -> torch.Tensor:
    return _subspace_method(ctx, lambda d: iso_c_merge(d, rank_tol=rank_tol), alpha, embeddings)


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
            "Defaults: common_space_fraction=0.8, alpha=1 (tuned on linspace(0,3,31)[1:] in the paper). "
            "rank_tol > 0 (not in the paper): common directions above rank_tol*||sum dW_t||_F, each task's above "
            "rank_tol*||dW_t||_F.",
    params=[Param("alpha", float, 1.0, help="scale of the merged update"),
            Param("common_space_fraction", float, 0.8, low=0.0, high=1.0,
                  help="fraction of the rank given to the common subspace"), _EMBEDDINGS, _RANK_TOL],
    needs_base=True,
    scale_param="alpha",
    search={"grid": _ALPHA_GRID},
)
def iso_cts(ctx: TensorContext, *, alpha: float, common_space_fraction: float, embeddings: str,
            rank_tol: float) -> torch.Tensor:
    return _subspace_method(ctx, lambda d: iso_cts_merge(d, common_space_fraction, rank_tol), alpha, embeddings)
