"""The spherical family: SLERP, NuSLERP, Multi-SLERP, the Karcher mean, and NearSwap."""

from __future__ import annotations

import math

import torch

from submerge.errors import ConfigError
from submerge.methods import kernels
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


def nuslerp_kernel(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool = False,
                   flatten: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Slerp from ``v0`` (t=0) to ``v1`` (t=1), whole tensor (``flatten``) or per vector along the last
    dimension (``row_wise``: along the first).  Both the angle and the interpolation use the raw vectors
    (normalised with a 1e-7 floor only for the angle); vectors with 1 - cos^2 <= eps^2 interpolate linearly."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    n0 = torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp_(min=1e-7)
    n1 = torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp_(min=1e-7)
    cos = ((v0 / n0) * (v1 / n1)).sum(-1, keepdim=True).clamp_(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    c0 = torch.sin((1 - t) * theta) / torch.sin(theta)
    c1 = torch.sin(t * theta) / torch.sin(theta)
    c0 = torch.where(colinear, torch.full_like(c0, 1 - t), c0)
    c1 = torch.where(colinear, torch.full_like(c1, t), c1)
    out = v0 * c0 + v1 * c1
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@register_method(
    name="nuslerp",
    pretty_name="NuSLERP",
    paper="mergekit's generalised SLERP (Goddard et al., Arcee's MergeKit, EMNLP 2024 industry track)",
    url="https://github.com/arcee-ai/mergekit",
    variant="as mergekit 0.1.5 (merge_methods/nuslerp.py): exactly two models with a weight each, "
            "t = w2 / (w1 + w2) (0.5 when the weights sum to ~0); with a base_model the two task vectors are "
            "slerped and added to the base, without one the two models themselves. nuslerp_flatten (default true) "
            "slerps the whole tensor as one vector; false slerps each row (nuslerp_row_wise: each column, "
            "i.e. along the first dimension). Nearly colinear vectors (1 - cos^2 <= 1e-16) interpolate linearly.",
    params=[Param("weight", float, per_model=True, help="relative weight; t = w2 / (w1 + w2)"),
            Param("nuslerp_flatten", bool, True, help="slerp the whole tensor as one vector"),
            Param("nuslerp_row_wise", bool, False, help="without flattening: slerp along the first dimension")],
    optional_base=True,
    min_models=2,
    max_models=2,
)
def nuslerp(ctx: TensorContext, *, weight: list[float], nuslerp_flatten: bool,
            nuslerp_row_wise: bool) -> torch.Tensor:
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    a, b = ctx.tensors
    if ctx.base is None:
        return nuslerp_kernel(t, a, b, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)
    base = ctx.base
    out = nuslerp_kernel(t, a.sub_(base), b.sub_(base), row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)
    return out.add_(base)


@register_method(
    name="multislerp",
    pretty_name="Multi-SLERP",
    paper="Goddard, Multi-SLERP (barycentric interpolation on a hypersphere), as implemented by mergekit",
    url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    variant="as mergekit 0.1.5 (merge_methods/multislerp.py): per tensor, the (task-vector, with a base_model) "
            "inputs are flattened and put on the unit sphere (norm + eps); their weighted mean direction is the "
            "tangent point; the weighted tangent vectors are mapped back with the exponential map and the result "
            "is scaled by the weighted mean norm. normalize_weights (default true) divides the weights by their sum; "
            "eps 1e-8. One model: returned as it is. A zero mean direction: linear interpolation for two models, an "
            "error naming the tensor for more, except where every weighted input is zero (with a base: a tensor "
            "no fine-tune changed, such as the embeddings of LoRA experts), where the result is scaled by their "
            "zero mean norm and is the base (mergekit 0.1.5 raises there).",
    params=[Param("weight", float, per_model=True, help="barycentric weight of each model"),
            Param("normalize_weights", bool, True, help="divide the weights by their sum"),
            Param("eps", float, 1e-8, low=0.0, help="numerical floor")],
    optional_base=True,
    min_models=1,
)
def multislerp(ctx: TensorContext, *, weight: list[float], normalize_weights: bool, eps: float) -> torch.Tensor:
    if len(ctx.tensors) == 1:
        return ctx.tensors[0]
    # memory: one [T, ...] stack (the inputs released as copied) plus one temporary for the per-model dots;
    # the sums over the models run in column blocks (same bits as whole)
    x = kernels.stack_released(ctx.tensors, ctx.base)
    flat = x.reshape(x.shape[0], -1)
    w = torch.tensor(weight, dtype=x.dtype, device=x.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    blocks = kernels.column_blocks(flat.shape[1], flat.shape[0], itemsize=flat.element_size())
    # the inputs are needed again only by the two-model fallback below
    units = flat / (norms + eps) if x.shape[0] == 2 else flat.div_(norms + eps)
    mean = torch.empty(flat.shape[1], dtype=x.dtype, device=x.device)
    for cols in blocks:
        mean[cols] = (units[:, cols] * w[:, None]).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    scale = (norms.squeeze(-1) * w).sum()
    if mean_norm < eps and scale == 0:  # every weighted input is zero (a tensor no LoRA expert adapts): the result
        out = torch.zeros(x.shape[1:], dtype=x.dtype, device=x.device)  # is scaled by their zero mean norm
        return out if ctx.base is None else out.add_(ctx.base)
    if mean_norm < eps:
        if x.shape[0] == 2:
            out = (x[0] * w[0] + x[1] * w[1]).reshape(x.shape[1:])
            return out if ctx.base is None else out.add_(ctx.base)
        raise ConfigError(
            f"multislerp: tensor {ctx.name}: the weighted mean direction of the inputs is zero (antipodal "
            f"inputs whose weights cancel); use other weights")
    mean = mean / mean_norm
    tangent = units.sub_((units * mean).sum(-1, keepdim=True) * mean)
    t_res = torch.empty_like(mean)
    for cols in blocks:
        t_res[cols] = (tangent[:, cols] * w[:, None]).sum(0)
    t_norm = torch.linalg.vector_norm(t_res) + eps
    out = mean * torch.cos(t_norm) + t_res * (torch.sin(t_norm) / t_norm)
    out = (out * scale).reshape(x.shape[1:])
    return out if ctx.base is None else out.add_(ctx.base)


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int = 10,
                 tol: float = 1e-5) -> torch.Tensor:
    """Weighted Karcher (Riemannian) mean of the tensors' directions on the unit sphere, scaled by the
    weighted mean norm; inputs with norm <= tol take no part in the direction."""
    if len(tensors) == 1:
        return tensors[0]
    dt = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    x = torch.stack(tensors)
    flat = x.reshape(len(tensors), -1)
    norms = torch.linalg.vector_norm(flat.to(dt), dim=-1)
    safe = torch.where(norms == 0, torch.ones_like(norms), norms)
    units = (flat / safe[:, None].to(flat.dtype)).to(x.dtype)
    valid = [i for i, n in enumerate(norms.tolist()) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    a = torch.tensor([alphas[i] for i in valid], dtype=torch.float64)
    a = (a / a.sum()).to(x.dtype)
    u = units[valid]
    mean = torch.zeros_like(u[0])
    for ai, ui in zip(a, u):  # in model order, as mergekit: the angles below are ill-conditioned near 0
        mean += ai * ui
    m_norm = torch.linalg.vector_norm(mean.to(dt))
    mean = u[0].clone() if m_norm.item() < tol else (mean / m_norm).to(mean.dtype)
    for _ in range(max_iter):
        # one dot product per model (torch.dot, not a matrix product): for nearly parallel directions
        # theta = arccos(dot) turns one ulp of dot (6e-8 in float32) into ~3e-4 of angle, so the summation
        # order of the dot decides the result at that level; mergekit's order is the reference
        tangent = torch.zeros_like(mean)
        for ai, ui in zip(a, u):
            dot = torch.clamp(torch.dot(mean, ui), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (ui - dot * mean)
        t_norm = torch.linalg.vector_norm(tangent.to(dt))
        if t_norm.item() < tol:
            break
        mean = (torch.cos(t_norm) * mean + torch.sin(t_norm) * (tangent / t_norm)).to(mean.dtype)
        u_norm = torch.linalg.vector_norm(mean.to(dt))
        if u_norm.item() > tol:
            mean = (mean / u_norm).to(mean.dtype)
    scale = (torch.tensor(alphas, dtype=norms.dtype) * norms).sum()
    return (scale * mean).to(x.dtype).reshape(x.shape[1:])


@register_method(
    name="karcher",
    pretty_name="Karcher mean",
    paper="Karcher, Riemannian center of mass and mollifier smoothing, CPAM 1977; for model merging as in "
          "mergekit (reference arXiv:2603.04972)",
    url="https://arxiv.org/abs/2603.04972",
    variant="as mergekit 0.1.5 (merge_methods/karcher.py): every input, a base_model included as one more "
            "input (mergekit adds it when it is not among the models), weighs 1/n; per tensor the directions' "
            "Karcher mean on the unit sphere by at most max_iter (default 10) Riemannian gradient steps "
            "(stop when the tangent norm < tol, default 1e-5; inputs of norm <= tol are left out of the "
            "direction), scaled by the mean norm. Computed in float32 (float64 for float64 inputs).",
    params=[Param("max_iter", int, 10, low=0, help="gradient steps on the sphere"),
            Param("tol", float, 1e-5, low=0.0, help="convergence and zero-norm tolerance")],
    base_as_input=True,
    min_models=1,
)
def karcher(ctx: TensorContext, *, max_iter: int, tol: float) -> torch.Tensor:
    n = len(ctx.tensors)
    return karcher_mean(ctx.tensors, [1.0 / n] * n, max_iter=max_iter, tol=tol)
