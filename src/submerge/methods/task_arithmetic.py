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
from submerge.methods import kernels, workspace
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
    normalize: bool,
    rescale: bool = False,
    rescale_norm: str = "l1",
    density: Optional[list[float]] = None,
    gamma: Optional[list[float]] = None,
    epsilon: Optional[list[float]] = None,
    topk_scope: str = "tensor",
    int8_mask: bool = False,
    **scale: float,
) -> torch.Tensor:
    """The whole family; ``scale`` carries ``lambda`` (a Python keyword, so it arrives by **)."""
    lambda_ = scale.get("lambda", 1.0)
    thresholds = ctx.state if topk_scope == "global" else None
    base = ctx.base
    assert base is not None
    n = len(ctx.tensors)
    norm = rescale_norm if rescale else None
    if sparsify is None and consensus is None and base.dtype in (torch.float32, torch.float64):
        return _weighted_sum_streaming(ctx, weight, lambda_, normalize)
    if _fused(sparsify, consensus, rescale, base):
        return _ties_fused(ctx, weight, density, thresholds, lambda_, normalize, sparsify)
    deltas = torch.empty((n,) + tuple(base.shape), dtype=base.dtype, device=base.device)

    def sparsify_one(i: int) -> None:
        d = torch.sub(ctx.tensors[i], base, out=deltas[i])
        ctx.tensors[i] = None  # the input is scratch: free it as soon as it is used
        if sparsify is None or (density[i] >= 1 and thresholds is None):
            return
        keep_prob = density[i]
        if sparsify == "magnitude":
            if thresholds is not None:  # global top-k (paper): one threshold per model
                mask = d.abs() >= thresholds[i]
            else:
                mask = kernels.magnitude_mask(d, density[i])
        elif sparsify == "random":
            mask = kernels.bernoulli_mask(d, density[i], ctx.generator)
        elif sparsify == "outliers":
            mask = kernels.outlier_mask(d, density[i], gamma[i])
        elif sparsify == "della":
            if density[i] - epsilon[i] <= 0 or density[i] + epsilon[i] >= 1:
                raise ConfigError(
                    f"della at {ctx.name}: density ± epsilon must lie in (0, 1), "
                    f"got density={density[i]}, epsilon={epsilon[i]}"
                )
            keep_prob = kernels.della_keep_probs(d, density[i], epsilon[i])
            mask = torch.rand(d.shape, generator=ctx.generator, device=d.device).lt_(keep_prob)
        else:  # pragma: no cover - registry guarantees the names
            raise ValueError(sparsify)
        kernels.rescale_masked(d, mask, norm, keep_prob)

    for i in range(n):
        sparsify_one(i)

    w = torch.tensor(weight, dtype=base.dtype, device=base.device)
    if any(x != 1 for x in weight):
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


def _fusible(sparsify: Optional[str], consensus: Optional[str]) -> bool:
    """Whether a family member (sparsifier, consensus rule) has the fused TIES path at all."""
    return consensus == "sum" and sparsify in (None, "magnitude")


def _fused(sparsify: Optional[str], consensus: Optional[str], rescale: bool, base: torch.Tensor) -> bool:
    """Whether the family member runs as :func:`_ties_fused` on these inputs."""
    return (_fusible(sparsify, consensus) and not rescale
            and base.device.type == "cpu" and base.dtype in (torch.float32, torch.float64))


def _trim_rules(tensors: list, base: torch.Tensor, density: Optional[list[float]],
                global_thresholds: Optional[list[float]], sparsify: Optional[str]) -> list:
    """Turn the inputs into their task vectors in place and find each one's top-k rule."""

    def rule_of(i: int) -> Optional[kernels.TopK]:
        tensors[i].sub_(base)  # the input becomes its task vector
        if global_thresholds is not None:
            return kernels.TopK(global_thresholds[i])
        if sparsify is None or density[i] >= 1:
            return None
        if density[i] <= 0:
            return kernels.TopK(float("inf"))
        return kernels.magnitude_threshold(tensors[i], density[i])

    # each model's task vector and threshold are independent (numpy's introselect releases the GIL):
    # side by side, one per core
    return workspace.parallel_map(rule_of, range(len(tensors)), sizes=[t.numel() for t in tensors],
                                min_size=1 << 18)


def _ties_fused(ctx: TensorContext, weight: list[float], density: Optional[list[float]],
                global_thresholds: Optional[list[float]], lambda_: float, normalize: bool,
                sparsify: Optional[str]) -> torch.Tensor:
    """TIES on CPU in float32/64: trim thresholds per model, then one chunked fused pass.

    Same result as the general path (tested), without [N, ...] temporaries: the inputs
    become their task vectors in place, and trimming, weighting, sign election, the
    disjoint merge, the scale and the base add run chunk by chunk in cache.  When the executor
    ran the stage hook (:func:`_stage_of`) on these inputs, on its reading thread while the previous
    tensor merged, they are task vectors already and ``ctx.staged`` holds their trim rules.
    """
    base = ctx.base
    tensors = list(ctx.tensors)
    ctx.tensors[:] = [None] * len(tensors)
    rules = ctx.staged
    if rules is None:
        rules = _trim_rules(tensors, base, density, global_thresholds, sparsify)
    return kernels.consensus_merge_chunked(tensors, rules, weight, normalize, torch.empty_like(base),
                                           scale=lambda_, add=base)


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


def _ties_global_thresholds(mp: ModelPass, gparams: dict) -> list[float]:
    """Per-model |delta| thresholds over the whole model (the TIES reference code's rule).

    The reference keeps ``|delta| >= kthvalue(|delta|, n - int(n * density))`` over the
    flattened model, i.e. ``int(n * density) + 1`` entries when there are no ties.
    """
    densities: list[Optional[float]] = []
    totals: list[int] = []
    wide = False  # float64 deltas need float64 keys (exact); float32 keys for everything else
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
            wide = wide or tensors[i].dtype == torch.float64
    selectors = [
        kernels.StreamingKth(max(1, n - int(n * d)), wide=wide) if d < 1 else None
        for n, d in zip(totals, densities)
    ]
    active = [s for s in selectors if s is not None]
    while active and not active[0].done:
        for name, tensors, base, params in mp:
            for i, x in enumerate(tensors):
                if selectors[i] is not None:
                    selectors[i].add(x - base)
        for s in active:
            s.next_pass()
    return [s.value() if s is not None else float("-inf") for s in selectors]


def _stage_of(sparsify: Optional[str], consensus: Optional[str]):
    """The family member's ``stage`` hook: for the fused TIES path with per-tensor trimming, the task
    vectors (in place) and their trim rules (the selection is most of TIES' work, and needs nothing but the
    inputs)."""
    if not _fusible(sparsify, consensus):
        return None

    def stage(tensors: list, base: Optional[torch.Tensor], params: dict) -> Optional[list]:
        if (base is None or params.get("topk_scope") == "global"
                or not _fused(sparsify, consensus, bool(params.get("rescale", False)), base)
                or any(t.shape != base.shape or t.dtype != base.dtype or t.device != base.device for t in tensors)):
            return None
        return _trim_rules(tensors, base, params.get("density"), None, sparsify)

    return stage


def _member(sparsify: Optional[str], consensus: Optional[str]):
    """One method of the family: a sparsifier and a consensus rule over `_merge_task_vectors`."""

    def merge(ctx: TensorContext, **params) -> torch.Tensor:
        return _merge_task_vectors(ctx, sparsify=sparsify, consensus=consensus, **params)

    return merge


_DARE = ("Yu et al., Language Models are Super Mario (DARE), ICML 2024", "https://arxiv.org/abs/2311.03099")
_BREADCRUMBS = ("Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse "
                "Masks, ECCV 2024", "https://arxiv.org/abs/2312.06795")
_DELLA = ("Deep et al., DELLA-Merging: Reducing Interference via Magnitude-Based Sampling, 2024",
          "https://arxiv.org/abs/2406.11617")
_GAMMA = Param("gamma", float, 0.01, per_model=True, low=0.0, high=1.0,
               help="fraction of largest-magnitude entries removed as outliers")
_EPSILON = Param("epsilon", float, 0.15, per_model=True, low=0.0, high=1.0,
                 help="half-width of the keep-probability window around density")
_TOPK_SCOPE = Param("topk_scope", str, "tensor", choices=("tensor", "global"),
                    help="trim per tensor (mergekit) or over the whole model (paper)")

# name, pretty name, (paper, url), sparsifier, consensus, normalize default, rescale default,
# extra parameters, randomized, variant
_FAMILY = [
    ("task_arithmetic", "Task Arithmetic",
     ("Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023", "https://arxiv.org/abs/2212.04089"),
     None, None, False, None, [], False,
     "theta = base + lambda * sum_i weight_i * (theta_i - base); with normalize, the sum is divided by "
     "sum_i weight_i. Defaults as mergekit: normalize=false, lambda=1."),
    ("ties", "TIES",
     ("Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023",
      "https://arxiv.org/abs/2306.01708"),
     "magnitude", "sum", True, False, [_DENSITY, _TOPK_SCOPE], False,
     "trim each task vector to its top-`density` magnitudes (topk_scope=tensor: per tensor, exactly "
     "max(1, int(density*n)) entries, as mergekit; topk_scope=global: one threshold over the whole model, "
     "as the paper's code), weight, elect the sign of the weighted sum (zero -> +), average the agreeing "
     "entries (normalize: divide by their total weight), scale by lambda. Defaults: density=1, "
     "normalize=true, rescale=false, lambda=1."),
    ("magnitude_prune", "Magnitude pruning + task arithmetic",
     ("PEFT's magnitude_prune combination (top-k magnitude trim, then weighted task arithmetic)",
      "https://huggingface.co/docs/peft/developer_guides/model_merging"),
     "magnitude", None, False, False, [_DENSITY], False,
     "each task vector trimmed to its top-`density` magnitudes per tensor, then task arithmetic (no sign "
     "election). Defaults: density=1, normalize=false, lambda=1."),
    ("dare_linear", "Linear DARE", _DARE, "random", None, False, True, [_DENSITY], True,
     "drop each task-vector entry with probability 1-density (Bernoulli), rescale the survivors "
     "(rescale_norm=l1: match the l1 norm, as mergekit; 'density': divide by density, as the paper), then "
     "task arithmetic. Defaults: density=1, rescale=true, normalize=false, lambda=1. Reproducible with "
     "--random-seed."),
    ("dare_ties", "DARE TIES", _DARE, "random", "sum", False, True, [_DENSITY], True,
     "DARE drop-and-rescale of each task vector, then TIES sign election and disjoint merge. Defaults: "
     "density=1, rescale=true (l1), normalize=false, lambda=1."),
    ("breadcrumbs", "Model Breadcrumbs", _BREADCRUMBS, "outliers", None, False, False, [_DENSITY, _GAMMA], False,
     "per tensor, drop the int(gamma*n) largest |delta| (outliers) and the smallest so that int(density*n) "
     "entries remain, then task arithmetic. Defaults: density=1, gamma=0.01, normalize=false, "
     "rescale=false, lambda=1."),
    ("breadcrumbs_ties", "Model Breadcrumbs with TIES", _BREADCRUMBS, "outliers", "sum", False, False,
     [_DENSITY, _GAMMA], False,
     "Breadcrumbs masks, then TIES sign election and disjoint merge. Defaults: density=1, gamma=0.01, "
     "normalize=false, rescale=false, lambda=1."),
    ("della", "DELLA", _DELLA, "della", "sum", True, True, [_DENSITY, _EPSILON], True,
     "MagPrune: per row, keep probabilities linear in magnitude rank from density-epsilon to "
     "density+epsilon, Bernoulli drop, rescale (l1 as mergekit, or 'density' = 1/p_i as the paper); then "
     "TIES sign election and disjoint merge. Defaults: density=1, epsilon=0.15, normalize=true, "
     "rescale=true, lambda=1."),
    ("della_linear", "Linear DELLA", _DELLA, "della", None, False, True, [_DENSITY, _EPSILON], True,
     "DELLA MagPrune sampling, then task arithmetic (no sign election). Defaults: density=1, epsilon=0.15, "
     "normalize=false, rescale=true, lambda=1."),
]

for (_name, _pretty, (_paper, _url), _sparsify, _consensus, _norm_default, _rescale_default, _extra,
     _randomized, _variant) in _FAMILY:
    _params = [_WEIGHT, *_extra, _LAMBDA, _normalize(_norm_default), _INT8]
    if _rescale_default is not None:
        _params += [_rescale(_rescale_default), _RESCALE_NORM]
    register_method(
        name=_name, pretty_name=_pretty, paper=_paper, url=_url, variant=_variant, params=_params,
        needs_base=True, randomized=_randomized,
        prepare=_ties_global_thresholds if _name == "ties" else None,
        prepare_when=(lambda g: g.get("topk_scope") == "global") if _name == "ties" else None,
        scale_param="lambda", search={"grid": [round(0.1 * i, 2) for i in range(1, 11)]},
        stage=_stage_of(_sparsify, _consensus),
    )(_fn := _member(_sparsify, _consensus))
    _fn.__name__ = _fn.__qualname__ = _name
    _fn.__doc__ = f"{_pretty} — {_paper} ({_url}).\n\nVariant: {_variant}"
del _name, _pretty, _paper, _url, _sparsify, _consensus, _norm_default, _rescale_default, _extra
del _randomized, _variant, _params, _fn
