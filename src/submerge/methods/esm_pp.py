"""ESM++: the ESM merge plus per-task low-rank residual experts chosen by prototype routing.

The merged tensors are exactly ESM's (same parameters, same scale search); while streaming, the
residuals ``W_t − W_ESM`` of the routed linears become rank-``r`` experts on each task's essential
subspace, written as ``experts.safetensors`` + ``experts.json`` beside the model
(:mod:`submerge.routing` builds, loads and runs them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from submerge.errors import ConfigError
from submerge.layers import parse_role_patterns
from submerge.methods.esm import _ESM_PARAMS, ESM_MACHINERY, esm
from submerge.methods.registry import Param, Sidecar, register_method
from submerge.routing.experts import ExpertSet, bias_residuals, is_routed, layer_experts, routed_roles


class ExpertSidecar(Sidecar):
    """Builds the experts of the routed layers as the executor streams the merge."""

    def __init__(self, params: dict, model_names: Sequence[str]):
        self.rank, self.bias = int(params["rank"]), bool(params["expert_bias"])
        self.roles = routed_roles(params["routed"])
        self.rules = parse_role_patterns(params.get("role_patterns") or "")
        self.experts = ExpertSet([Path(str(n)).name or str(n) for n in model_names], self.rank,
                                 info={"routed": params["routed"], "rank": self.rank, "bias": self.bias,
                                       "recipe": params.get("recipe"), "alpha": params.get("alpha")})
        self.biases: dict[str, torch.Tensor] = {}
        self.skipped: list[str] = []

    def _routed_weight(self, name: str) -> bool:
        return name.endswith(".weight") and is_routed(name, self.roles, self.rules)

    def wants(self, name: str) -> bool:
        return self._routed_weight(name) or (self.bias and name.endswith(".bias")
                                             and self._routed_weight(name[: -len(".bias")] + ".weight"))

    def add(self, name: str, merged: torch.Tensor, finetuned: list[torch.Tensor],
            stats: Optional[Sequence[Any]], **_: Any) -> None:
        module = name.rsplit(".", 1)[0]
        if name.endswith(".bias"):
            self.biases[module] = bias_residuals(merged, finetuned)
            return
        if merged.dim() != 2 or stats is None or any(s is None for s in stats):
            self.skipped.append(name)
            return
        self.experts.layers[module] = layer_experts(merged, finetuned, list(stats), self.rank, merged.dtype)

    def finish(self, folder: Any, model_params: int, model_bytes: int) -> list[str]:
        if not self.experts.layers:
            raise ConfigError("esm_pp: no routed layer had calibration statistics in every model; "
                              "check `routed`, `role_patterns` and each model's `calibration:`")
        for module, b in self.biases.items():
            if module in self.experts.layers:
                self.experts.layers[module].bias = b
        ov = self.experts.overhead(model_params, model_bytes)
        self.experts.info["overhead"] = ov
        self.experts.save(folder)
        notes = [f"ESM++ experts: {len(self.experts.layers)} routed layers x {len(self.experts.tasks)} tasks at rank "
                 f"{self.rank} ({self.experts.info['routed']}); {ov['expert_params']:,} expert parameters + "
                 f"{ov['prototype_values']:,} prototype values = {ov['params_pct_of_base']:.2f}% of the base's "
                 f"parameters, {ov['expert_bytes'] / 2**20:.1f} MiB = {ov.get('bytes_pct_of_base', 0):.2f}% of its "
                 f"bytes (experts.safetensors; load with submerge.routing.load, plain transformers loads the "
                 f"static merge alone)"]
        if self.skipped:
            notes.append(f"ESM++: {len(self.skipped)} routed layer(s) without statistics stay static: "
                         + ", ".join(self.skipped[:4]) + (" ..." if len(self.skipped) > 4 else ""))
        return notes


@register_method(
    name="esm_pp", evaluation="routed", builds_on="esm",
    pretty_name="ESM++ (ESM + low-rank residual experts with prototype routing)",
    paper="Li et al., ESM++ (journal extension of Model Merging in the Essential Subspace, arXiv 2606.19164); "
          "code github.com/kiddo127/ESM (ESM-ViT/esmpp.py, ESM-RoBERTa merge.py::esm_pp)",
    url="https://arxiv.org/abs/2606.19164",
    variant="The static model is ESM with the same parameters (default recipe essential_tsv; alpha searched as "
            "ESM's). Per task and routed linear: residual W_t - W_ESM, B = its top-rank essential directions "
            "(eigenvectors of d G_t d^T from the task's calibration stats), A = B^T d; prototype = the layer's "
            "mean input in expert t. Defaults rank=32, routed=qkv,mlp_in (the authors' ViT code; 'all' = their "
            "GLUE code), expert_bias=True (submerge addition: the bias residual, T x d_out numbers). Inference: "
            "submerge.routing (cosine top-1 per sample and layer).",
    params=_ESM_PARAMS + [
        Param("rank", int, 32, low=1, help="rank r of each task's residual expert"),
        Param("routed", str, "qkv,mlp_in", help="roles routed: comma list of q,k,v,qkv,attn_out,mlp_in,mlp_out or all"),
        Param("expert_bias", bool, True, help="store each task's bias residual with its expert"),
    ],
    **ESM_MACHINERY,
    sidecar=ExpertSidecar,
)
def esm_pp(ctx, **p: Any) -> torch.Tensor:
    return esm(ctx, **p)
