"""The task-arithmetic family: task vectors, optionally sparsified, optionally sign-elected.

Every method here computes task vectors ``delta_i = theta_i - theta_base``, then

1. sparsifies each one (none / magnitude top-k / DARE Bernoulli / Breadcrumbs
   outlier window / DELLA MagPrune), with an optional norm-preserving rescale;
2. multiplies by its per-model ``weight``;
3. sums them: plainly, or (TIES-style) only the entries whose sign agrees with
   the elected sign;
4. optionally divides by the (agreeing) total weight (``normalize``), multiplies by
   ``lambda`` and adds the result to the base.

Defaults and parameter names follow mergekit 0.1.5 exactly, so a mergekit YAML
gives the same tensors; where the paper's variant differs it is an option.
"""

from __future__ import annotations

from typing import Optional

import torch

from submerge.errors import ConfigError
from submerge.methods import kernels
from submerge.methods.registry import ModelPass, Param, TensorContext, register_method

_WEIGHT = Param("weight", float, per_model=True, help="scale of this model's task vector")
_DENSITY = Param("density", float, 1.0, per_model=True, low=0.0, high=1.0,
                 help="fraction of task-vector entries kept")
_LAMBDA = Param("lambda", float, 1.0, help="scale of the merged task vector")
_INT8 = Param("int8_mask", bool, False, help="accepted for mergekit configs; no numeric effect")
_RESCALE_NORM = Param(
    "rescale_norm", str, "l1", choices=kernels.RESCALE_NORMS,
    help="how survivors are rescaled when rescale is on: match the l1/l2/linf norm "
         "(mergekit) or divide by the keep probability ('density', the DARE paper)",
)


def _normalize(default: bool) -> Param:
    return Param("normalize", bool, default, help="divide by the sum of (agreeing) weights")


def _rescale(default: bool) -> Param:
    return Param("rescale", bool, default, help="rescale survivors after sparsification")


def _merge_task_vectors(
    ctx: TensorContext,
    *,
    sparsify: Optional[str],
    consensus: Optional[str],
    weight: list[float],
    lambda_: float,
    normalize: bool,
    rescale: bool = False,
    rescale_norm: str = "l1",
    density: Optional[list[float]] = None,
    gamma: Optional[list[float]] = None,
    epsilon: Optional[list[float]] = None,
    thresholds: Optional[list[float]] = None,
) -> torch.Tensor:
    base = ctx.base
    assert base is not None
    n = len(ctx.tensors)
    norm = rescale_norm if rescale else None
    if sparsify is None and consensus is None and base.dtype in (torch.float32, torch.float64):
        return _weighted_sum_streaming(ctx, weight, lambda_, normalize)
    deltas = torch.empty((n,) + tuple(base.shape), dtype=base.dtype, device=base.device)
    for i in range(n):
        d = torch.sub(ctx.tensors[i], base, out=deltas[i])
        ctx.tensors[i] = None  # the input is scratch: free it as soon as it is used
        if sparsify is None or (density[i] >= 1 and thresholds is None):
            continue
        keep_prob = None
        if sparsify == "magnitude":
            if thresholds is not None:  # global top-k (paper): one threshold per model
                mask = d.abs() >= thresholds[i]
                keep_prob = density[i]
            else:
                mask = kernels.magnitude_mask(d, density[i])
                keep_prob = density[i]
        elif sparsify == "random":
            mask = kernels.bernoulli_mask(d, density[i], ctx.generator)
            keep_prob = density[i]
        elif sparsify == "outliers":
            mask = kernels.outlier_mask(d, density[i], gamma[i])
            keep_prob = density[i]
        elif sparsify == "della":
            if density[i] - epsilon[i] <= 0 or density[i] + epsilon[i] >= 1:
                raise ConfigError(
                    f"della at {ctx.name}: density ± epsilon must lie in (0, 1), "
                    f"got density={density[i]}, epsilon={epsilon[i]}"
                )
            keep_prob = kernels.della_keep_probs(d, density[i], epsilon[i])
            mask = torch.rand(d.shape, generator=ctx.generator, device=d.device) < keep_prob
        else:  # pragma: no cover - registry guarantees the names
            raise ValueError(sparsify)
        kernels.rescale_masked(d, mask, norm, keep_prob)
        del mask

    w = torch.tensor(weight, dtype=base.dtype, device=base.device)
    deltas.mul_(w.reshape((-1,) + (1,) * base.dim()))
    if consensus is not None:
        sign = kernels.elect_sign(deltas, consensus)
        merged = kernels.disjoint_merge(deltas, w, sign, normalize)
    else:
        merged = deltas.sum(dim=0)
        if normalize:
            total = w.sum()
            merged /= total if total.abs() >= 1e-8 else 1.0
    del deltas
    if lambda_ != 1:
        merged *= lambda_
    return merged.add_(base)


def _weighted_sum_streaming(ctx: TensorContext, weight: list[float], lambda_: float,
                            normalize: bool) -> torch.Tensor:
    """Plain task arithmetic, accumulated in place one input at a time (no [N, ...] stack).

    Used for float32/float64 compute; low-precision compute keeps the stacked sum so that
    ``--compute-dtype bfloat16`` reproduces mergekit's rounding exactly.
    """
    base = ctx.base
    acc = ctx.tensors[0].sub_(base).mul_(weight[0])
    ctx.tensors[0] = None
    for i in range(1, len(ctx.tensors)):
        acc.add_(ctx.tensors[i].sub_(base), alpha=weight[i])
        ctx.tensors[i] = None
    if normalize:
        total = sum(weight)
        if abs(total) >= 1e-8:
            acc.div_(total)
    if lambda_ != 1:
        acc.mul_(lambda_)
    return acc.add_(base)


# --------------------------------------------------------------------------------------
# task_arithmetic
# --------------------------------------------------------------------------------------
@register_method(
    name="task_arithmetic",
    pretty_name="Task Arithmetic",
    paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
    url="https://arxiv.org/abs/2212.04089",
    variant="theta = base + lambda * sum_i weight_i * (theta_i - base); with normalize, the sum is "
            "divided by sum_i weight_i. Defaults as mergekit: normalize=false, lambda=1.",
    params=[_WEIGHT, _LAMBDA, _normalize(False), _INT8],
    needs_base=True,
)
def task_arithmetic(ctx: TensorContext, *, weight, normalize, int8_mask, **p) -> torch.Tensor:
    return _merge_task_vectors(ctx, sparsify=None, consensus=None, weight=weight,
                               lambda_=p["lambda"], normalize=normalize)


# --------------------------------------------------------------------------------------
# ties (per-tensor top-k as mergekit, or the paper's global top-k)
# --------------------------------------------------------------------------------------
def _ties_global_thresholds(mp: ModelPass, gparams: dict) -> list[float]:
    """Per-model |delta| thresholds over the whole model (the TIES reference code's rule).

    The reference keeps ``|delta| >= kthvalue(|delta|, n - int(n * density))`` over the
    flattened model, i.e. ``int(n * density) + 1`` entries when there are no ties.
    """
    densities: list[Optional[float]] = []
    selectors: list[Optional[kernels.StreamingKth]] = []
    totals: list[int] = []
    first = True
    for name, tensors, base, params in mp:
        if first:
            densities = list(params["density"])
            totals = [0] * len(tensors)
            first = False
        elif list(params["density"]) != densities:
            raise ConfigError(
                f"ties with topk_scope: global needs one density per model for the whole model; "
                f"tensor {name} resolves to {params['density']}, earlier tensors to {densities}"
            )
        for i in range(len(tensors)):
            totals[i] += tensors[i].numel()
    selectors = [
        kernels.StreamingKth(max(1, n - int(n * d))) if d < 1 else None
        for n, d in zip(totals, densities)
    ]
    for add in ("add_pass1", "add_pass2"):
        for name, tensors, base, params in mp:
            for i, x in enumerate(tensors):
                if selectors[i] is not None:
                    getattr(selectors[i], add)(x - base)
    return [s.value() if s is not None else float("-inf") for s in selectors]


@register_method(
    name="ties",
    pretty_name="TIES",
    paper="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023",
    url="https://arxiv.org/abs/2306.01708",
    variant="trim each task vector to its top-`density` magnitudes (topk_scope=tensor: per tensor, "
            "exactly max(1, int(density*n)) entries, as mergekit; topk_scope=global: one threshold "
            "over the whole model, as the paper's code), weight, elect the sign of the weighted sum "
            "(zero -> +), average the agreeing entries (normalize: divide by their total weight), "
            "scale by lambda. Defaults: density=1, normalize=true, rescale=false, lambda=1.",
    params=[_WEIGHT, _DENSITY, _LAMBDA, _normalize(True), _rescale(False), _RESCALE_NORM, _INT8,
            Param("topk_scope", str, "tensor", choices=("tensor", "global"),
                  help="trim per tensor (mergekit) or over the whole model (paper)")],
    needs_base=True,
    prepare=_ties_global_thresholds,
    prepare_when=lambda g: g.get("topk_scope") == "global",
)
def ties(ctx: TensorContext, *, weight, density, normalize, rescale, rescale_norm, int8_mask,
         topk_scope, **p) -> torch.Tensor:
    return _merge_task_vectors(
        ctx, sparsify="magnitude", consensus="sum", weight=weight, lambda_=p["lambda"],
        normalize=normalize, rescale=rescale, rescale_norm=rescale_norm, density=density,
        thresholds=ctx.state if topk_scope == "global" else None,
    )


# --------------------------------------------------------------------------------------
# magnitude_prune
# --------------------------------------------------------------------------------------
@register_method(
    name="magnitude_prune",
    pretty_name="Magnitude pruning + task arithmetic",
    paper="PEFT's magnitude_prune combination (top-k magnitude trim, then weighted task arithmetic)",
    url="https://huggingface.co/docs/peft/developer_guides/model_merging",
    variant="each task vector trimmed to its top-`density` magnitudes per tensor, then "
            "task arithmetic (no sign election). Defaults: density=1, normalize=false, lambda=1.",
    params=[_WEIGHT, _DENSITY, _LAMBDA, _normalize(False), _rescale(False), _RESCALE_NORM, _INT8],
    needs_base=True,
)
def magnitude_prune(ctx: TensorContext, *, weight, density, normalize, rescale, rescale_norm,
                    int8_mask, **p) -> torch.Tensor:
    return _merge_task_vectors(ctx, sparsify="magnitude", consensus=None, weight=weight,
                               lambda_=p["lambda"], normalize=normalize, rescale=rescale,
                               rescale_norm=rescale_norm, density=density)


# --------------------------------------------------------------------------------------
# DARE
# --------------------------------------------------------------------------------------
_DARE_PAPER = "Yu et al., Language Models are Super Mario (DARE), ICML 2024"
_DARE_URL = "https://arxiv.org/abs/2311.03099"


@register_method(
    name="dare_linear",
    pretty_name="Linear DARE",
    paper=_DARE_PAPER,
    url=_DARE_URL,
    variant="drop each task-vector entry with probability 1-density (Bernoulli), rescale the "
            "survivors (rescale_norm=l1: match the l1 norm, as mergekit; 'density': divide by "
            "density, as the paper), then task arithmetic. Defaults: density=1, rescale=true, "
            "normalize=false, lambda=1. Reproducible with --random-seed.",
    params=[_WEIGHT, _DENSITY, _LAMBDA, _normalize(False), _rescale(True), _RESCALE_NORM, _INT8],
    needs_base=True,
    randomized=True,
)
def dare_linear(ctx: TensorContext, *, weight, density, normalize, rescale, rescale_norm,
                int8_mask, **p) -> torch.Tensor:
    return _merge_task_vectors(ctx, sparsify="random", consensus=None, weight=weight,
                               lambda_=p["lambda"], normalize=normalize, rescale=rescale,
                               rescale_norm=rescale_norm, density=density)


@register_method(
    name="dare_ties",
    pretty_name="DARE TIES",
    paper=_DARE_PAPER,
    url=_DARE_URL,
    variant="DARE drop-and-rescale of each task vector, then TIES sign election and disjoint "
            "merge. Defaults: density=1, rescale=true (l1), normalize=false, lambda=1.",
    params=[_WEIGHT, _DENSITY, _LAMBDA, _normalize(False), _rescale(True), _RESCALE_NORM, _INT8],
    needs_base=True,
    randomized=True,
)
def dare_ties(ctx: TensorContext, *, weight, density, normalize, rescale, rescale_norm,
              int8_mask, **p) -> torch.Tensor:
    return _merge_task_vectors(ctx, sparsify="random", consensus="sum", weight=weight,
                               lambda_=p["lambda"], normalize=normalize, rescale=rescale,
                               rescale_norm=rescale_norm, density=density)


# --------------------------------------------------------------------------------------
# Model Breadcrumbs
# --------------------------------------------------------------------------------------
_BC_PAPER = "Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, ECCV 2024"
_BC_URL = "https://arxiv.org/abs/2312.06795"
_GAMMA = Param("gamma", float, 0.01, per_model=True, low=0.0, high=1.0,
               help="fraction of largest-magnitude entries removed as outliers")


@register_method(
    name="breadcrumbs",
    pretty_name="Model Breadcrumbs",
    paper=_BC_PAPER,
    url=_BC_URL,
    variant="per tensor, drop the int(gamma*n) largest |delta| (outliers) and the smallest so that "
            "int(density*n) entries remain, then task arithmetic. Defaults: density=1, gamma=0.01, "
            "normalize=false, rescale=false, lambda=1.",
    params=[_WEIGHT, _DENSITY, _GAMMA, _LAMBDA, _normalize(False), _rescale(False), _RESCALE_NORM,
            _INT8],
    needs_base=True,
)
def breadcrumbs(ctx: TensorContext, *, weight, density, gamma, normalize, rescale, rescale_norm,
                int8_mask, **p) -> torch.Tensor:
    return _merge_task_vectors(ctx, sparsify="outliers", consensus=None, weight=weight,
                               lambda_=p["lambda"], normalize=normalize, rescale=rescale,
                               rescale_norm=rescale_norm, density=density, gamma=gamma)


@register_method(
    name="breadcrumbs_ties",
    pretty_name="Model Breadcrumbs with TIES",
    paper=_BC_PAPER,
    url=_BC_URL,
    variant="Breadcrumbs masks, then TIES sign election and disjoint merge. Defaults: density=1, "
            "gamma=0.01, normalize=false, rescale=false, lambda=1.",
    params=[_WEIGHT, _DENSITY, _GAMMA, _LAMBDA, _normalize(False), _rescale(False), _RESCALE_NORM,
            _INT8],
    needs_base=True,
)
def breadcrumbs_ties(ctx: TensorContext, *, weight, density, gamma, normalize, rescale,
                     rescale_norm, int8_mask, **p) -> torch.Tensor:
    return _merge_task_vectors(ctx, sparsify="outliers", consensus="sum", weight=weight,
                               lambda_=p["lambda"], normalize=normalize, rescale=rescale,
                               rescale_norm=rescale_norm, density=density, gamma=gamma)


# --------------------------------------------------------------------------------------
# DELLA
# --------------------------------------------------------------------------------------
_DELLA_PAPER = "Deep et al., DELLA-Merging: Reducing Interference via Magnitude-Based Sampling, 2024"
_DELLA_URL = "https://arxiv.org/abs/2406.11617"
_EPSILON = Param("epsilon", float, 0.15, per_model=True, low=0.0, high=1.0,
                 help="half-width of the keep-probability window around density")


@register_method(
    name="della",
    pretty_name="DELLA",
    paper=_DELLA_PAPER,
    url=_DELLA_URL,
    variant="MagPrune: per row, keep probabilities linear in magnitude rank from density-epsilon to "
            "density+epsilon, Bernoulli drop, rescale (l1 as mergekit, or 'density' = 1/p_i as the "
            "paper); then TIES sign election and disjoint merge. Defaults: density=1, epsilon=0.15, "
            "normalize=true, rescale=true, lambda=1.",
    params=[_WEIGHT, _DENSITY, _EPSILON, _LAMBDA, _normalize(True), _rescale(True), _RESCALE_NORM,
            _INT8],
    needs_base=True,
    randomized=True,
)
def della(ctx: TensorContext, *, weight, density, epsilon, normalize, rescale, rescale_norm,
          int8_mask, **p) -> torch.Tensor:
    return _merge_task_vectors(ctx, sparsify="della", consensus="sum", weight=weight,
                               lambda_=p["lambda"], normalize=normalize, rescale=rescale,
                               rescale_norm=rescale_norm, density=density, epsilon=epsilon)


@register_method(
    name="della_linear",
    pretty_name="Linear DELLA",
    paper=_DELLA_PAPER,
    url=_DELLA_URL,
    variant="DELLA MagPrune sampling, then task arithmetic (no sign election). Defaults: density=1, "
            "epsilon=0.15, normalize=false, rescale=true, lambda=1.",
    params=[_WEIGHT, _DENSITY, _EPSILON, _LAMBDA, _normalize(False), _rescale(True), _RESCALE_NORM,
            _INT8],
    needs_base=True,
    randomized=True,
)
def della_linear(ctx: TensorContext, *, weight, density, epsilon, normalize, rescale,
                 rescale_norm, int8_mask, **p) -> torch.Tensor:
    return _merge_task_vectors(ctx, sparsify="della", consensus=None, weight=weight,
                               lambda_=p["lambda"], normalize=normalize, rescale=rescale,
                               rescale_norm=rescale_norm, density=density, epsilon=epsilon)
