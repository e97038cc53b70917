"""Posterior merging: each fine-tuned model is a Gaussian (or mixture) posterior; the merge is the MAP
of their weighted product — Fisher merging and its generalisations.

Derivation (Daheim et al. ICLR 2024; Monzón Maldonado et al., Variational Model Merging, arXiv
2412.08147).  Each expert's posterior ``q_t(θ) ∝ p₀(θ) · L_t(θ)`` shares the prior ``p₀ = N(θ₀, P₀⁻¹)``
(θ₀ = the base).  The surrogate of the weighted multitask posterior ``p₀ · Π L_t^{α_t}`` is
``Π q_t^{α_t} / p₀^{Σα − 1}``.  For Gaussian ``q_t = N(θ_t, P_t⁻¹)`` with ``P_t = P₀ + H_t``
(``H_t`` the likelihood precision, here a diagonal Fisher) its maximiser is

    θ̂ = θ₀ + (P₀ + Σ_t α_t H_t)⁻¹ Σ_t α_t (P₀ + H_t)(θ_t − θ₀).

``H_t = 0`` gives task arithmetic with weights α (every posterior as wide as the prior);
``P₀ → 0`` gives Fisher-weighted averaging ``Σ α_t H_t θ_t / Σ α_t H_t`` (Matena & Raffel).
With quadratic losses ``½ (θ − m_t)ᵀ H_t (θ − m_t)`` and ``θ_t`` their posterior means, θ̂ is the
exact minimiser of ``Σ α_t ℓ_t + ½ (θ − θ₀)ᵀ P₀ (θ − θ₀)`` (tested).

Mixture posteriors ``q_t = Σ_k π_tk N(θ_tk, P_tk⁻¹)`` (components = several fine-tunes of one task,
``π`` uniform): the surrogate is maximised by EM (an MM algorithm, so the objective never decreases):
E-step ``r_tk ∝ π_tk N(θ; θ_tk, P_tk⁻¹)`` over the whole model, M-step = the Gaussian rule above with
component weights ``α_t r_tk``.  Initialised at the Gaussian rule with weights ``α_t π_tk``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

import torch

from submerge.errors import ConfigError
from submerge.methods import kernels
from submerge.methods.registry import ModelPass, Param, TensorContext, register_method

log = logging.getLogger("submerge")

FAMILIES = ("isotropic", "diagonal", "mixture")


# ------------------------------------------------------------------------------ kernels
def gaussian_posterior_merge(theta0: torch.Tensor, thetas: Sequence[torch.Tensor], H: Sequence[Optional[torch.Tensor]],
                             alphas: Sequence[float], p0: float) -> torch.Tensor:
    """``θ₀ + (P₀ + Σ α_t H_t)⁻¹ Σ α_t (P₀ + H_t)(θ_t − θ₀)`` elementwise (diagonal precisions;
    ``H_t`` None = 0).  Computed in float32 or wider; returns ``theta0``'s dtype."""
    ct = torch.promote_types(theta0.dtype, torch.float32)
    t0 = theta0.to(ct)
    num = torch.zeros_like(t0)
    den = torch.full_like(t0, float(p0))
    for th, h, a in zip(thetas, H, alphas):
        if a == 0:
            continue
        d = th.to(ct) - t0
        if h is None:
            num.add_(d, alpha=a * p0)
        else:
            h = h.to(ct)
            num.addcmul_(h + p0, d, value=a)
            den.add_(h, alpha=a)
    tiny = torch.finfo(ct).tiny
    return (t0 + torch.where(den > tiny, num / den.clamp(min=tiny), torch.zeros_like(num))).to(theta0.dtype)


def gaussian_log_density(theta: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor | float) -> float:
    """``log N(θ; mean, diag(precision)⁻¹)`` summed over the tensor's entries (float32 or wider)."""
    ct = torch.promote_types(theta.dtype, torch.float32)
    d = theta.to(ct) - mean.to(ct)
    n = d.numel()
    if isinstance(precision, torch.Tensor):
        p = precision.to(ct)
        quad = float((p * d * d).sum())
        logdet = float(torch.log(p).sum())
    else:
        quad = float(precision) * float((d * d).sum())
        logdet = n * math.log(precision)
    return 0.5 * (logdet - quad) - 0.5 * n * math.log(2 * math.pi)


def mixture_objective(logdens: torch.Tensor, groups: Sequence[int], alphas_task: Sequence[float],
                      log_prior: float) -> float:
    """``Σ_t α_t log Σ_k π_tk N_tk − (Σα − 1) log p₀`` from the per-component log densities (π uniform)."""
    total = 0.0
    for t, a in enumerate(alphas_task):
        comp = logdens[[i for i, g in enumerate(groups) if g == t]]
        total += a * float(torch.logsumexp(comp, 0) - math.log(len(comp)))
    return total - (sum(alphas_task) - 1.0) * log_prior


def responsibilities(logdens: torch.Tensor, groups: Sequence[int]) -> torch.Tensor:
    """``r_tk`` (softmax of the log densities within each task's components)."""
    r = torch.zeros_like(logdens)
    for t in sorted(set(groups)):
        idx = [i for i, g in enumerate(groups) if g == t]
        r[idx] = torch.softmax(logdens[idx], 0)
    return r


# ------------------------------------------------------------------------------ parameters
def _groups(labels: Sequence[str]) -> list[int]:
    """Per model, its task index (models with the same non-empty ``task`` label are components)."""
    ids: dict[str, int] = {}
    out = []
    for i, lab in enumerate(labels):
        key = lab if lab else f"\0{i}"
        out.append(ids.setdefault(key, len(ids)))
    return out


def _task_alphas(weights: Sequence[float], groups: Sequence[int]) -> list[float]:
    alphas: dict[int, float] = {}
    for w, g in zip(weights, groups):
        if g in alphas and alphas[g] != w:
            raise ConfigError(f"posterior: components of one task need the same weight, got {alphas[g]} and {w}")
        alphas.setdefault(g, w)
    return [alphas[g] for g in range(len(alphas))]


def _prior(p0_rel: float, H: Sequence[Optional[torch.Tensor]]) -> float:
    """Prior precision: ``prior_precision`` × the mean Fisher of this tensor over the models (1 if none)."""
    hs = [h for h in H if h is not None]
    if not hs:
        return p0_rel
    scale = float(sum(float(h.mean()) for h in hs) / len(hs))
    return p0_rel * scale if scale > 0 else p0_rel


def _fishers(ctx: TensorContext) -> list[Optional[torch.Tensor]]:
    if ctx.stats is None:
        return [None] * len(ctx.tensors)
    out = []
    for h, t in zip(ctx.stats, ctx.tensors):
        if h is not None and tuple(h.shape) != tuple(t.shape):
            raise ConfigError(f"{ctx.name}: Fisher of shape {list(h.shape)} for a tensor of shape {list(t.shape)}")
        out.append(None if h is None else h.to(t.device))
    return out


# ------------------------------------------------------------------------------ fisher
@register_method(
    name="fisher",
    pretty_name="Fisher merging",
    paper="Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022",
    url="https://arxiv.org/abs/2111.09832",
    variant="Diagonal Fisher-weighted average theta = sum_t w_t (F_t + eps) theta_t / sum_t w_t (F_t + eps); "
            "F_t from `submerge fisher` (true, sampled or empirical diagonal Fisher), eps = epsilon x the tensor's mean "
            "Fisher (default 1e-6; entries without Fisher anywhere become the weighted average). No base needed. "
            "Tensors without a Fisher: weighted average. Defaults: weight 1 per model.",
    params=[Param("weight", float, 1.0, per_model=True, low=0.0, help="task weight alpha_t"),
            Param("epsilon", float, 1e-6, low=0.0, help="Fisher floor, relative to the tensor's mean Fisher")],
    needs_stats=True,
    stats_kind="fisher",
    inputs_read_only=True,
)
def fisher(ctx: TensorContext, *, weight: list[float], epsilon: float) -> torch.Tensor:
    H = _fishers(ctx)
    ref = ctx.tensors[0]
    if sum(weight) <= 0:
        raise ConfigError(f"fisher: the weights sum to {sum(weight)}; give at least one positive weight")
    floor = _prior(epsilon, H) if any(h is not None for h in H) else 1.0
    # per entry, in float64, one column block at a time (the float64 sums of a whole 30k x 384 table and their
    # temporaries were 0.4 GB)
    out = torch.empty_like(ref)
    flat_out = out.reshape(-1)
    flat_t = [t.reshape(-1) for t in ctx.tensors]
    flat_h = [None if h is None else h.reshape(-1) for h in H]
    for cols in kernels.column_blocks(flat_out.numel(), 4, itemsize=8):
        num = torch.zeros(flat_out[cols].shape, dtype=torch.float64, device=ref.device)
        den = torch.zeros_like(num)
        for t, h, w in zip(flat_t, flat_h, weight):
            f = (h[cols].double() if h is not None else torch.zeros_like(num)) + floor
            num.add_(f * t[cols].double(), alpha=w)
            den.add_(f, alpha=w)
        flat_out[cols] = (num / den).to(ref.dtype)
    return out


# ------------------------------------------------------------------------------ posterior
class _MixtureState:
    def __init__(self, theta: dict[str, torch.Tensor], resp: torch.Tensor, history: list[float]):
        self.theta, self.resp, self.history = theta, resp, history  # history: objective after init, each step


def _mixture_prepare(mp: ModelPass, g: dict) -> Optional[_MixtureState]:
    """EM over the whole model: per step one streamed pass for the component log densities at the
    current estimate (E-step) and one for the new estimate (M-step).  Keeps one model copy in RAM."""
    if g["prior_precision"] <= 0:
        raise ConfigError("posterior (mixture): prior_precision must be > 0 (the component densities need it)")
    if not mp.names:
        return _MixtureState({}, torch.zeros(0, dtype=torch.float64), [])
    first = mp.params_of(mp.names[0])
    groups = _groups(first["task"])
    alphas = _task_alphas(first["weight"], groups)
    n = len(groups)
    pi = torch.tensor([1.0 / groups.count(gr) for gr in groups], dtype=torch.float64)
    priors: dict[str, float] = {}

    def prior(name: str, H) -> float:
        if name not in priors:
            priors[name] = _prior(g["prior_precision"], H)
        return priors[name]

    def fishers(name: str) -> list[Optional[torch.Tensor]]:
        st = mp.stats(name)
        return [None if st is None else st[i] for i in range(n)]

    def m_step(resp: torch.Tensor) -> dict[str, torch.Tensor]:
        comp_w = [alphas[gr] * float(resp[i]) for i, gr in enumerate(groups)]
        out = {}
        for name, tensors, base, _ in mp:
            H = fishers(name)
            out[name] = gaussian_posterior_merge(base, tensors, H, comp_w, prior(name, H))
        return out

    def e_step(theta: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        logdens = torch.zeros(n, dtype=torch.float64)
        log_prior = 0.0
        for name, tensors, base, _ in mp:
            H = fishers(name)
            p0 = prior(name, H)
            cur = theta[name]
            for i in range(n):
                prec = (H[i].float() + p0) if H[i] is not None else p0
                logdens[i] += gaussian_log_density(cur, tensors[i], prec)
            log_prior += gaussian_log_density(cur, base, p0)
        return logdens, mixture_objective(logdens, groups, alphas, log_prior)

    resp = pi
    theta = m_step(resp)
    history = []
    for _ in range(g["em_steps"]):
        logdens, obj = e_step(theta)
        history.append(obj)
        resp = responsibilities(logdens, groups)
        theta = m_step(resp)
    if g["em_steps"]:
        history.append(e_step(theta)[1])
    log.info("posterior (mixture): %d EM steps, objective %s, responsibilities %s", g["em_steps"],
             [round(h, 3) for h in history], [round(float(x), 3) for x in resp])
    return _MixtureState(theta, resp, history)


@register_method(
    name="posterior",
    pretty_name="Posterior (variational) merging",
    paper="Monzón Maldonado, Daheim, Möllenhoff, Gurevych, Khan, Variational Model Merging for Pareto Front "
          "Estimation in Multitask Finetuning, arXiv 2412.08147 (2026); Daheim et al., Model Merging by "
          "Uncertainty-Based Gradient Matching, ICLR 2024",
    url="https://arxiv.org/abs/2412.08147",
    variant="MAP of prod_t q_t^alpha_t / p0^(sum alpha - 1), prior N(base, P0^-1). family=isotropic: every "
            "q_t = N(theta_t, p_t^-1 I) with per-model `precision` (relative to the prior's); equal precisions "
            "= task arithmetic with weights alpha. family=diagonal: P_t = P0 + F_t (diagonal Fisher from `submerge "
            "fisher`), theta = base + (P0 + sum a_t F_t)^-1 sum a_t (P0 + F_t)(theta_t - base). family=mixture: "
            "models sharing a per-model `task` label are components of one task's mixture (uniform pi), solved "
            "by `em_steps` EM steps over the whole model (default 3), initialised at the diagonal rule. "
            "P0 = prior_precision x the tensor's mean Fisher (default 1e-3). Weights alpha_t per model (default 1).",
    params=[Param("weight", float, 1.0, per_model=True, low=0.0, help="task weight alpha_t"),
            Param("family", str, "diagonal", choices=FAMILIES, help="posterior family"),
            Param("prior_precision", float, 1e-3, low=0.0,
                  help="prior precision P0 (isotropic: absolute, relative to precision 1; diagonal/mixture: x the "
                       "tensor's mean Fisher)"),
            Param("precision", float, 1.0, per_model=True, low=0.0, help="isotropic family: this model's precision"),
            Param("task", str, "", per_model=True, help="mixture family: task label; equal labels = components"),
            Param("em_steps", int, 3, low=0, help="mixture family: EM steps")],
    needs_base=True,
    needs_stats=True,
    stats_kind="fisher",
    stats_when=lambda g: g.get("family") != "isotropic",
    prepare=_mixture_prepare,
    prepare_when=lambda g: g.get("family") == "mixture",
)
def posterior(ctx: TensorContext, *, weight: list[float], family: str, prior_precision: float,
              precision: list[float], task: list[str], em_steps: int) -> torch.Tensor:
    base = ctx.base
    if family == "isotropic":
        # P_t = p_t I, P0 = prior_precision I  ->  H_t = (p_t - p0) I
        p0 = prior_precision
        if any(p < p0 for p in precision):
            raise ConfigError(f"posterior (isotropic): each model's precision must be >= prior_precision ({p0}); "
                              f"got {precision}")
        H = [torch.full_like(base, p - p0, dtype=torch.float32) for p in precision]
        return gaussian_posterior_merge(base, ctx.tensors, H, weight, p0)
    if family == "mixture":
        return ctx.state.theta[ctx.name].to(base.dtype)
    H = _fishers(ctx)
    return gaussian_posterior_merge(base, ctx.tensors, H, weight, _prior(prior_precision, H))
