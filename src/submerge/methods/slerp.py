"""Spherical linear interpolation between the base and one other model."""

from __future__ import annotations

import math

import torch

from submerge.methods.registry import Param, TensorContext, register_method


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """Interpolate on the great circle between ``v0`` (t=0) and ``v1`` (t=1), whole tensor flattened.

    The angle comes from the normalised tensors; the interpolation is applied to
    the raw tensors.  Nearly collinear pairs (|cos| > dot_threshold) fall back to
    linear interpolation.
    """
    a = v0.reshape(-1)
    b = v1.reshape(-1)
    na = torch.linalg.vector_norm(a).item()
    nb = torch.linalg.vector_norm(b).item()
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    dot = torch.dot(a / na, b / nb).clamp(-1, 1).item()
    if abs(dot) > dot_threshold:
        c0, c1 = 1 - t, t
    else:
        theta = math.acos(dot)
        s = math.sin(theta)
        c0, c1 = math.sin((1 - t) * theta) / s, math.sin(t * theta) / s
    return (v0 * c0).add_(v1, alpha=c1)


@register_method(
    name="slerp",
    pretty_name="SLERP",
    paper="Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985 (as used for model "
          "merging by mergekit)",
    url="https://en.wikipedia.org/wiki/Slerp",
    variant="per tensor, slerp from the base (t=0) to the other model (t=1) over the flattened "
            "tensor; linear interpolation when |cos| > 0.9995. t is required and is usually a "
            "per-layer gradient.",
    params=[Param("t", float, help="interpolation factor: 0 = base, 1 = the other model")],
    needs_base=True,
    min_models=1,
    max_models=1,
)
def slerp_method(ctx: TensorContext, *, t: float) -> torch.Tensor:
    assert ctx.base is not None
    return slerp(t, ctx.base, ctx.tensors[0])


@register_method(
    name="nearswap",
    pretty_name="NearSwap",
    paper="alchemonaut, NearSwap (QuartetAnemoi-70B model card), as implemented by mergekit",
    url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    variant="as mergekit 0.1.5 (merge_methods/nearswap.py): per entry, w = clamp(t / max(|base - other|, 1e-6), "
            "0, 1), result = w*other + (1 - w)*base: entries where the two models nearly agree (|difference| <= t) "
            "take the other model's value, larger differences keep mostly the base. t has no default (required).",
    params=[Param("t", float, low=0.0, help="distance scale: |base - other| <= t takes the other model's value")],
    needs_base=True,
    min_models=1,
    max_models=1,
)
def nearswap(ctx: TensorContext, *, t: float) -> torch.Tensor:
    a, b = ctx.base, ctx.tensors[0]
    w = (b - a).abs_().clamp_(min=1e-6).reciprocal_().mul_(t).clamp_(0.0, 1.0)
    return torch.lerp(a, b, w)
