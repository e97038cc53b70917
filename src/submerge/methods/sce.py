"""SCE: select (by variance across tasks), calculate (norm weights), erase (sign conflicts)."""

from __future__ import annotations

import torch

from submerge.methods import kernels
from submerge.methods.registry import Param, TensorContext, register_method


def variance_across(x: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """Population variance over dim 0 of ``[T, ...]``, bitwise ``x.var(dim=0, unbiased=False)`` on CPU: the
    same Welford recurrence in float64, run in cache-sized column blocks (torch's own reduction over the
    outer dimension is 10-20x slower)."""
    T = x.shape[0]
    flat = x.reshape(T, -1)
    out = torch.empty(flat.shape[1], dtype=x.dtype, device=x.device)
    for s in range(0, flat.shape[1], chunk):
        block = flat[:, s:s + chunk].double()
        mean = block[0].clone()
        m2 = torch.zeros_like(mean)
        for i in range(1, T):
            delta = block[i] - mean
            mean.add_(delta / (i + 1))
            m2.add_(delta.mul_(block[i] - mean))
        out[s:s + chunk] = m2.div_(T)
    return out.reshape(x.shape[1:])


def sce_merge(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """The SCE task-vector fusion of stacked deltas ``[T, ...]`` (modified in place).  After the per-model
    weights (a mean over each model's whole task vector) every step is per entry or a sum over the models: it
    runs in column blocks, so its temporaries are a block's size, not ``[T, ...]``."""
    T = deltas.shape[0]
    if select_topk < 1:
        var = variance_across(deltas)
        k = int(int(torch.count_nonzero(var)) * select_topk)
        keep = kernels.rank_window_mask(var.abs(), var.numel() - k, var.numel())  # the k largest variances
        deltas.mul_(keep)
    w = deltas.square().reshape(T, -1).mean(1)
    total = float(w.sum())
    w = torch.full_like(w, 1.0 / T) if abs(total) < 1e-6 else w / total
    flat = deltas.reshape(T, -1)
    merged = torch.empty(flat.shape[1], dtype=deltas.dtype, device=deltas.device)
    for cols in kernels.column_blocks(flat.shape[1], T, itemsize=flat.element_size()):
        part = flat[:, cols]
        sign = torch.where(part.sum(0) >= 0, 1.0, -1.0).to(deltas.dtype)
        weights = (part.sign() == sign).to(deltas.dtype).mul_(w[:, None])
        merged[cols] = (part * weights).sum(0).div_(weights.sum(0).clamp_(min=1e-6))
    return merged.reshape(deltas.shape[1:])


@register_method(
    name="sce",
    pretty_name="SCE (select, calculate, erase)",
    paper="Wan et al., FuseChat: Knowledge Fusion of Chat Models (SCE merging), 2024",
    url="https://arxiv.org/abs/2408.07990",
    variant="as mergekit 0.1.5 (merge_methods/sce.py): task vectors; if select_topk < 1 keep, per tensor, the "
            "int(select_topk * #nonzero-variance) entries with the largest variance across tasks (ties broken by "
            "position; mergekit's torch.topk leaves their order to the backend); weights = mean squared task vector "
            "per model, normalised (uniform when they sum to < 1e-6); entries whose sign disagrees with the sign of "
            "the summed task vectors (zero sum counts as +) are erased; result = base + weighted mean over the "
            "agreeing models. Defaults select_topk=1.0 (no selection).",
    params=[Param("select_topk", float, 1.0, low=0.0, high=1.0,
                  help="share of entries kept by variance across tasks"),
            Param("int8_mask", bool, False, help="accepted for mergekit configs; masks are booleans here")],
    needs_base=True,
    min_models=1,
)
def sce(ctx: TensorContext, *, select_topk: float, int8_mask: bool) -> torch.Tensor:
    return sce_merge(kernels.task_vectors(ctx), select_topk).add_(ctx.base)
