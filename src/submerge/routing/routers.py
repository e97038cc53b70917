"""Routers for ESM++ beside the authors' cosine-to-prototype rule.

Both put a linear scorer on each routed layer (``score_t = x̄ · w_t + b_t`` on the token-mean layer input
``x̄``; top-1 as the cosine rule), stored with the experts and used by :func:`submerge.routing.attach`
(``rule="auto"``), at the cost of the cosine rule: one ``[d_in x T]`` product per routed layer.

* :func:`gaussian_router` — from what the calibration statistics already hold: per task and layer the input
  mean ``μ_t`` and second moment (``G_t / n_t``).  One Gaussian per task with a covariance shared across tasks
  (the mean of the tasks' covariances ``G_t/n_t − μ_t μ_tᵀ``), shrunk towards a multiple of the identity
  (Ledoit–Wolf style, ``Σ_s = (1 − s) Σ + s · tr(Σ)/d · I``): the Bayes rule with equal priors is linear,
  ``w_t = Σ_s⁻¹ μ_t``, ``b_t = −½ μ_tᵀ Σ_s⁻¹ μ_t`` (= routing by Mahalanobis distance).  No data beyond the
  statistics, no training.
* :func:`train_router` — per layer, a multinomial logistic regression (L2-regularised, full-batch L-BFGS) on the
  token-mean inputs of calibration texts whose task is known by where they came from (no class labels), as
  WEMoE-style routers are trained without labels; the inputs are collected in the static merge (the model the
  router sees at inference), expert corrections off.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from submerge.errors import ConfigError
from submerge.routing.experts import ExpertSet


def gaussian_router(experts: ExpertSet, stats: Sequence[Any], shrinkage: float = 0.1) -> ExpertSet:
    """Give every routed layer of ``experts`` (in place; returned) the shared-covariance Gaussian rule from
    ``stats`` (one calibration source per task, as for :func:`~submerge.routing.build_experts`)."""
    from submerge.stats.load import load_stats

    if not 0 <= shrinkage <= 1:
        raise ConfigError(f"shrinkage must be in [0, 1], got {shrinkage}")
    if len(stats) != len(experts.tasks):
        raise ConfigError(f"gaussian_router: {len(experts.tasks)} tasks but {len(stats)} calibration sources")
    stats = [load_stats(s) for s in stats]
    for name, layer in experts.layers.items():
        per = [s.lookup(name + ".weight") for s in stats]
        if any(p is None for p in per):
            raise ConfigError(f"gaussian_router: no statistics for routed layer {name} in every task")
        mus = torch.stack([p.mean.double() for p in per])  # [T, d]
        cov = sum(p.gram.double() / max(p.count, 1) - torch.outer(m, m) for p, m in zip(per, mus)) / len(per)
        d = cov.shape[0]
        cov = (1 - shrinkage) * cov + shrinkage * (torch.trace(cov) / d) * torch.eye(d, dtype=cov.dtype)
        w = torch.linalg.solve(cov, mus.T).T  # Σ⁻¹ μ_t, [T, d]
        layer.router_w = w.float()
        layer.router_b = (-0.5 * (w * mus).sum(-1)).float()
    experts.info["router"] = {"kind": "gaussian", "shrinkage": shrinkage}
    return experts


@torch.no_grad()
def collect_pooled(model: torch.nn.Module, experts: ExpertSet, batches: Sequence[Sequence[Any]],
                   call: Optional[Callable[[torch.nn.Module, Any], Any]] = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each routed layer's token-mean inputs over ``batches[t]`` (task t's unlabeled inputs) in ``model``
    as it is (the static merge): ``({layer: [N, d_in]}, {layer: task of each row [N]})``."""
    from submerge.routing.runtime import attach, pool_tokens

    call = call or (lambda m, b: m(**b))
    router = attach(model, experts, mode="base")
    rows: dict[str, list[torch.Tensor]] = {}
    labels: dict[str, list[torch.Tensor]] = {}
    current = [0]
    hooks = []
    for layer in router.layers.values():
        def hook(mod, args, _name=layer.layer_name):
            pooled = pool_tokens(args[0], router.state.mask).float().cpu()
            rows.setdefault(_name, []).append(pooled)
            labels.setdefault(_name, []).append(torch.full((pooled.shape[0],), current[0], dtype=torch.long))
        hooks.append(layer.register_forward_pre_hook(hook))
    try:
        for t, task_batches in enumerate(batches):
            current[0] = t
            for b in task_batches:
                call(model, b)
    finally:
        for h in hooks:
            h.remove()
        router.detach()
    if not rows:
        raise ConfigError("train_router: no routed layer saw an input; check the batches and the call")
    return {k: torch.cat(v) for k, v in rows.items()}, {k: torch.cat(v) for k, v in labels.items()}


def fit_linear(x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float = 1e-2,
               max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression ``softmax(x W^T + b)`` on standardised inputs (L-BFGS, L2 on W);
    returns ``W, b`` for the raw inputs."""
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    z = ((x - mu) / sd).double()
    w = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w.T + b, y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_raw = (w.detach() / sd.double()).float()
    b_raw = (b.detach() - (w.detach() * (mu / sd).double()).sum(-1)).float()
    return w_raw, b_raw


def train_router(model: torch.nn.Module, experts: ExpertSet, batches: Sequence[Sequence[Any]], *,
                 call: Optional[Callable[[torch.nn.Module, Any], Any]] = None, weight_decay: float = 1e-2,
                 max_iter: int = 200) -> ExpertSet:
    """Train every routed layer's linear router (in place; returned) on ``batches[t]`` — task t's unlabeled
    inputs, run through ``model`` (the static merge the experts belong to) by ``call(model, batch)`` (default
    ``model(**batch)``)."""
    if len(batches) != len(experts.tasks):
        raise ConfigError(f"train_router: {len(experts.tasks)} tasks but {len(batches)} lists of batches")
    xs, y = collect_pooled(model, experts, batches, call)
    for name, layer in experts.layers.items():
        if name not in xs:
            raise ConfigError(f"train_router: routed layer {name} saw no input")
        layer.router_w, layer.router_b = fit_linear(xs[name], y[name], len(experts.tasks), weight_decay, max_iter)
    experts.info["router"] = {"kind": "trained", "weight_decay": weight_decay,
                              "n_inputs": int(next(iter(y.values())).numel())}
    return experts
