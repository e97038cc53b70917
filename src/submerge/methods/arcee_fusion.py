"""Arcee Fusion: keep only the base-to-model changes whose importance is an outlier."""

from __future__ import annotations

import torch

from submerge.methods import kernels
from submerge.methods.registry import TensorContext, register_method


def fusion_mask(importance: torch.Tensor) -> torch.Tensor:
    """Entries whose importance reaches median + 1.5 * IQR (Tukey's upper fence; lower-interpolated
    quantiles, as mergekit's)."""
    q1, med, q3 = kernels.lower_quantiles(importance.reshape(-1), (0.25, 0.5, 0.75))
    return importance >= med + 1.5 * (q3 - q1)


def importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|model - base| times, per row (last dimension), KL(softmax(model) || softmax(base))."""
    p = torch.softmax(model, dim=-1).add_(1e-8)
    q = torch.softmax(base, dim=-1).add_(1e-8)
    kl = (p * torch.log(p / q)).sum(-1, keepdim=True)
    return (model - base).abs_().mul_(kl)


@register_method(
    name="arcee_fusion",
    pretty_name="Arcee Fusion",
    paper="Arcee AI, Arcee Fusion (selective fusion by importance), as implemented by mergekit 0.1.5",
    url="https://arcee.ai",
    variant="as mergekit 0.1.5 (merge_methods/arcee_fusion.py): base and exactly one model; importance = "
            "|model - base| * KL(softmax(model) || softmax(base)) per row (last dimension; +1e-8 in both "
            "distributions); the model's change is kept where importance >= median + 1.5 * (Q3 - Q1), else the "
            "base value. Quantiles are the exact lower order statistics of the whole tensor (index floor(q*(n-1))); "
            "mergekit computes the same from a random sample of 1,000,000 entries for larger tensors, so on those "
            "the thresholds (and a few kept entries) differ from mergekit's run to run. No parameters (no defaults to set).",
    params=[],
    needs_base=True,
    min_models=1,
    max_models=1,
)
def arcee_fusion(ctx: TensorContext) -> torch.Tensor:
    base, model = ctx.base, ctx.tensors[0]
    keep = fusion_mask(importance(model, base))
    return torch.where(keep, model, base)
