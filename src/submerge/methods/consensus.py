"""TALL masks and Consensus merging: where each task's information sits in the multi-task vector.

Wang, Dimitriadis, Ortiz-Jiménez, Fleuret & Frossard, "Localizing Task Information for Improved Model
Merging and Compression", ICML 2024 (https://arxiv.org/abs/2405.07813); the authors' code (tall_masks,
also in the TSV-M repository) for the exact rules:

* task vectors ``τ_t = θ_t − θ_0``; the multi-task vector ``τ_MTL`` = ``Σ_t w_t τ_t`` (task arithmetic)
  or the TIES merge of the τ_t (top-``density`` trim, elected sign, disjoint **sum**, as their
  ``ties_merging(..., "dis-sum")``);
* TALL mask of task t: ``m_t = |τ_t| > λ_t · |τ_MTL − τ_t|`` (strict), λ_t per task (the authors choose it on
  each task's validation accuracy from {0.2, 0.3, 0.4, 0.5, 0.6}; ``submerge bench`` does the same);
* Consensus: keep the entries at least ``k`` tasks' masks use (k = 2 removes "selfish" and "catastrophic"
  weights; k = 0 is the plain method, k > T the base), ``θ = θ_0 + λ · (consensus ⊙ τ_MTL)``, λ on validation;
* TALL-mask compression: the multi-task model ``θ_0 + τ_MTL`` plus one bit per parameter and task; task t is
  ``θ_0 + m_t ⊙ τ_MTL`` (needs the task id at inference) — :mod:`submerge.routing.tall` loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from submerge.methods import kernels
from submerge.methods.registry import Param, Sidecar, TensorContext, register_method

_PAPER = ("Wang et al., Localizing Task Information for Improved Model Merging and Compression (TALL masks, "
          "Consensus merging), ICML 2024")
_URL = "https://arxiv.org/abs/2405.07813"
_WEIGHT = Param("weight", float, 1.0, per_model=True, help="scale of this model's task vector in the multi-task vector")
_TALL_LAMBDA = Param("tall_lambda", float, 0.4, per_model=True, low=0.0,
                     help="TALL mask threshold of this task: keep |tau_t| > tall_lambda * |tau_MTL - tau_t|")
_K = Param("k", int, 2, low=0, help="keep the entries used by at least k tasks' masks")
_LAMBDA = Param("lambda", float, 1.0, help="scale of the masked multi-task vector")
_DENSITY = Param("density", float, 0.2, per_model=True, low=0.0, high=1.0,
                 help="TIES trim: fraction of each task vector's entries kept")


def tall_masks(deltas: torch.Tensor, merged: torch.Tensor, lambdas: Sequence[float]) -> torch.Tensor:
    """Boolean ``[T, ...]``: ``|τ_t| > λ_t · |τ_MTL − τ_t|`` for the stacked task vectors ``deltas``.

    One task at a time into two tensor-sized buffers: the broadcast form held four ``[T, ...]`` float
    temporaries (1.5 GB for 8 tasks' word embeddings of a 23M-parameter model)."""
    out = torch.empty(deltas.shape, dtype=torch.bool, device=deltas.device)
    gap, mag = torch.empty_like(merged), torch.empty_like(merged)
    for t, lam in enumerate(lambdas):
        torch.sub(merged, deltas[t], out=gap).abs_().mul_(float(torch.tensor(lam, dtype=deltas.dtype)))
        torch.gt(torch.abs(deltas[t], out=mag), gap, out=out[t])
    return out


def consensus_mask(masks: torch.Tensor, k: int) -> torch.Tensor:
    """Entries used by at least ``k`` of the task masks ``[T, ...]`` (counted task by task: a sum over dim 0
    would first widen the whole ``[T, ...]`` boolean stack to integers)."""
    count = torch.zeros(masks.shape[1:], dtype=torch.int32, device=masks.device)
    for m in masks:
        count += m
    return count >= k


def multitask_vector(deltas: torch.Tensor, weight: Sequence[float], ties_density: Optional[Sequence[float]] = None
                     ) -> torch.Tensor:
    """``τ_MTL``: the weighted sum of the task vectors, or (``ties_density`` given) their TIES merge with a
    disjoint sum (trim each to its top-density magnitudes, weight, elect the sign of the sum, add the agreeing
    entries), as the authors' TALL/Consensus-TIES code."""
    w = torch.tensor(list(weight), dtype=deltas.dtype, device=deltas.device)
    if ties_density is None:
        return torch.tensordot(w, deltas, dims=1)
    trimmed = kernels.trim_each(deltas, ties_density)
    trimmed.mul_(w.reshape((-1,) + (1,) * (deltas.dim() - 1)))
    sign = kernels.elect_sign(trimmed)
    return kernels.disjoint_merge(trimmed, w, sign, normalize=False)


def _deltas(ctx: TensorContext) -> torch.Tensor:
    return kernels.task_vectors(ctx)


def _consensus(ctx: TensorContext, weight, tall_lambda, k, scale, density=None) -> torch.Tensor:
    deltas = _deltas(ctx)
    merged = multitask_vector(deltas, weight, density)
    keep = consensus_mask(tall_masks(deltas, merged, tall_lambda), k)
    return merged.mul_(keep).mul_(scale).add_(ctx.base)


@register_method(
    name="consensus_ta", pretty_name="Consensus Task Arithmetic", paper=_PAPER, url=_URL,
    variant="tau_MTL = sum_t weight_t tau_t; TALL masks m_t = |tau_t| > tall_lambda_t |tau_MTL - tau_t|; keep the "
            "entries at least k masks use; theta = base + lambda * consensus * tau_MTL. Defaults: weight=1, "
            "tall_lambda=0.4 (middle of the authors' grid 0.2..0.6; choose it per task on validation), k=2, lambda=1 "
            "(choose on validation, the paper's grid 0.1..1.0).",
    params=[_WEIGHT, _TALL_LAMBDA, _K, _LAMBDA], needs_base=True, per_task_params=("tall_lambda",),
    scale_param="lambda", search={"grid": [round(0.1 * i, 2) for i in range(1, 11)]},
)
def consensus_ta(ctx: TensorContext, weight: list[float], tall_lambda: list[float], k: int, **scale: float
                 ) -> torch.Tensor:
    return _consensus(ctx, weight, tall_lambda, k, scale["lambda"])


@register_method(
    name="consensus_ties", pretty_name="Consensus TIES", paper=_PAPER, url=_URL,
    variant="tau_MTL = TIES merge of the task vectors with a disjoint sum (top-density trim per tensor, elected "
            "sign of the weighted sum, agreeing entries added: the authors' ties_merging(..., 'dis-sum')); TALL "
            "masks against it from the untrimmed tau_t; keep the entries at least k masks use; theta = base + "
            "lambda * consensus * tau_MTL. Defaults: density=0.2 (the authors' top-20%), weight=1, tall_lambda=0.4, "
            "k=2, lambda=1 (choose on validation).",
    params=[_WEIGHT, _DENSITY, _TALL_LAMBDA, _K, _LAMBDA], needs_base=True, per_task_params=("tall_lambda",),
    scale_param="lambda", search={"grid": [round(0.1 * i, 2) for i in range(1, 11)]},
)
def consensus_ties(ctx: TensorContext, weight: list[float], density: list[float], tall_lambda: list[float], k: int,
                   **scale: float) -> torch.Tensor:
    return _consensus(ctx, weight, tall_lambda, k, scale["lambda"], density)


class TallSidecar(Sidecar):
    """Per task, the packed TALL mask of every merged tensor (``tall_masks.safetensors`` + ``.json``)."""

    def __init__(self, params: dict, model_names: Sequence[str]):
        from submerge.routing.tall import TallMasks

        self.masks = TallMasks([Path(str(n)).name or str(n) for n in model_names])

    def wants(self, name: str) -> bool:
        return True

    def add(self, name: str, merged: torch.Tensor, finetuned: list[torch.Tensor], stats: Optional[Sequence[Any]],
            *, base: Optional[torch.Tensor] = None, params: Optional[dict] = None) -> None:
        assert base is not None and params is not None
        base = base.float()
        deltas = torch.stack([t.float() - base for t in finetuned])
        tau = multitask_vector(deltas, params["weight"])
        self.masks.add(name, tall_masks(deltas, tau, params["tall_lambda"]), params["tall_lambda"])

    def finish(self, folder: Any, model_params: int, model_bytes: int) -> list[str]:
        size = self.masks.save(folder)
        n = len(self.masks.tasks)
        kept = self.masks.kept_fraction()
        return [f"TALL masks: {n} tasks x {self.masks.n_params:,} bits = {size / 2**20:.1f} MiB "
                f"(tall_masks.safetensors); task t = base + mask_t * (this model - base), "
                f"submerge.routing.tall.task_state(...); kept per task: "
                + ", ".join(f"{t} {100 * f:.1f}%" for t, f in kept.items())
                + f". Storage: this model + masks = {(model_bytes + size) / 2**20:.1f} MiB against {n} experts = "
                  f"{n * model_bytes / 2**20:.1f} MiB (the base is needed too, as by every task vector)."]


@register_method(
    name="tall_masks", pretty_name="TALL masks (multi-task model + per-task bit masks, needs the task id)",
    paper=_PAPER, url=_URL,
    variant="The output model is base + sum_t weight_t tau_t (the multi-task vector at scale 1, as the paper); "
            "beside it tall_masks.safetensors holds, per task, m_t = |tau_t| > tall_lambda_t |tau_MTL - tau_t| "
            "as packed bits (+ tall_masks.json). Task t's model is base + m_t * (output - base) "
            "(submerge.routing.tall). Defaults: weight=1, tall_lambda=0.4 (the authors choose each task's on its "
            "validation accuracy from 0.2..0.6; submerge bench does).",
    params=[_WEIGHT, _TALL_LAMBDA], needs_base=True, sidecar=TallSidecar, evaluation="task_id",
    per_task_params=("tall_lambda",),
)
def tall_masks_method(ctx: TensorContext, weight: list[float], tall_lambda: list[float]) -> torch.Tensor:
    return multitask_vector(_deltas(ctx), weight).add_(ctx.base)

