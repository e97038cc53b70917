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
    (entries only t changed) — r = 0 gives plain RAM."""
    T = deltas.shape[0]
    flat = deltas.reshape(T, -1)
    changed = flat.abs() > epsilon
    count = changed.sum(0)
    shared, unique = changed & (count > 1), changed & (count == 1)
    zero = torch.zeros((), dtype=flat.dtype)
    merged = torch.where(shared, flat, zero).sum(0) / count.clamp(min=1).to(flat.dtype)
    only = torch.where(unique, flat, zero)
    if r != 0.0:
        n_shared = shared.sum(1).to(flat.dtype)
        n_unique = unique.sum(1).to(flat.dtype)
        rho = n_shared / n_unique.clamp(min=epsilon)
        lam = 1 + r * rho.clamp(min=0, max=alpha)
        only = only * lam[:, None]
    return merged.add_(only.sum(0)).reshape(deltas.shape[1:])


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
