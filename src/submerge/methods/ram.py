"""RAM and RAM+ (tensor-local): task vectors summed where one model changed a weight, averaged where several did."""

from __future__ import annotations

import torch

from submerge.methods import kernels
from submerge.methods.registry import Param, TensorContext, register_method

_PAPER = "Reinforced Agent Merging (RAM), arXiv:2601.13572, as implemented by mergekit 0.1.5"
_URL = "https://arxiv.org/abs/2601.13572"


def ram_merge(deltas: torch.Tensor, epsilon: float, r: float = 0.0, alpha: float = 0.0) -> torch.Tensor:
    """Merge stacked task vectors ``[T, ...]``: an entry changed (|delta| > epsilon) by exactly one model keeps
    that model's change times its lambda_t; an entry changed by several gets their mean change; unchanged
    entries are 0.  lambda_t = 1 + r * clamp(rho_t, 0, alpha), rho_t = (entries t shares with another model) /
    (entries only t changed) — r = 0 gives plain RAM.  Computed in column blocks (every step is per entry or a
    sum over the models), so the temporaries are a block's size, not ``[T, ...]``."""
    T = deltas.shape[0]
    flat = deltas.reshape(T, -1)
    blocks = kernels.column_blocks(flat.shape[1], T, itemsize=flat.element_size())
    zero = torch.zeros((), dtype=flat.dtype)
    merged = torch.empty(flat.shape[1], dtype=flat.dtype, device=flat.device)
    n_shared = torch.zeros(T, dtype=torch.int64)
    n_unique = torch.zeros(T, dtype=torch.int64)
    unique_blocks = []
    for cols in blocks:
        part = flat[:, cols]
        changed = part.abs() > epsilon
        count = changed.sum(0)
        shared, unique = changed & (count > 1), changed & (count == 1)
        merged[cols] = torch.where(shared, part, zero).sum(0) / count.clamp(min=1).to(flat.dtype)
        if r != 0.0:  # lambda_t needs every block's counts first: keep the (boolean) masks
            n_shared += shared.sum(1)
            n_unique += unique.sum(1)
            unique_blocks.append(unique)
        else:
            merged[cols] += torch.where(unique, part, zero).sum(0)
    if r != 0.0:
        rho = n_shared.to(flat.dtype) / n_unique.to(flat.dtype).clamp(min=epsilon)
        lam = (1 + r * rho.clamp(min=0, max=alpha))[:, None]
        for cols, unique in zip(blocks, unique_blocks):
            merged[cols] += (torch.where(unique, flat[:, cols], zero) * lam).sum(0)
    return merged.reshape(deltas.shape[1:])


_VARIANT = ("per tensor, task vectors tau_t = model_t - base; an entry counts as changed by model t when "
            "|tau_t| > epsilon (default 1e-5); entries changed by one model take that change{lam}, entries changed "
            "by several the mean of their changes, others stay at the base (as mergekit 0.1.5, merge_methods/ram.py)")


@register_method(
    name="ram",
    pretty_name="Reinforced Agent Merging",
    paper=_PAPER,
    url=_URL,
    variant=_VARIANT.format(lam=""),
    params=[Param("epsilon", float, 1e-5, low=0.0, help="a |change| above this counts as a change")],
    needs_base=True,
    min_models=1,
)
def ram(ctx: TensorContext, *, epsilon: float) -> torch.Tensor:
    return ram_merge(kernels.task_vectors(ctx), epsilon).add_(ctx.base)


@register_method(
    name="ramplus_tl",
    pretty_name="Reinforced Agent Merging Plus (tensor-local)",
    paper=_PAPER,
    url=_URL,
    variant=_VARIANT.format(lam=" times lambda_t = 1 + r * clamp(rho_t, 0, alpha), rho_t = (entries of this "
                                  "tensor t shares with others) / (entries only t changed), counted per tensor; "
                                  "defaults r=0.1, alpha=0.2"),
    params=[Param("r", float, 0.1, help="gain on the shared/unique ratio"),
            Param("alpha", float, 0.2, low=0.0, help="cap on the shared/unique ratio"),
            Param("epsilon", float, 1e-5, low=0.0, help="a |change| above this counts as a change")],
    needs_base=True,
    min_models=1,
)
def ramplus_tl(ctx: TensorContext, *, r: float, alpha: float, epsilon: float) -> torch.Tensor:
    return ram_merge(kernels.task_vectors(ctx), epsilon, r, alpha).add_(ctx.base)
