"""ESM++ residual experts: per task and routed linear layer, a low-rank ``B·A`` of what the static
merge lost on that task's essential subspace, plus the task's prototype (mean layer input).

Construction (the authors' ``esmpp.py`` / ``merge.py::esm_pp``): for task ``t`` and layer ``ℓ``
with merged weight ``M`` and fine-tuned weight ``W_t``, the residual ``δ = W_t − M``; its
essential subspace ``B`` = the top-``r`` eigenvectors of ``δ G_t δᵀ`` (``G_t = XᵀX`` of that
layer's inputs in expert ``t``, from :mod:`submerge.stats.gram`), and ``A = Bᵀ δ`` — so that
``x·(B A)ᵀ`` keeps the part of the residual's output shift that task's inputs excite most.
The prototype is the token-mean layer input in expert ``t``.  submerge also stores the bias
residual ``b_t − b_M`` (T·d_out numbers; the authors' code drops it), so that oracle routing
with full-rank experts on every differing linear reproduces the fine-tuned models exactly.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from safetensors import safe_open

from submerge.errors import CheckpointError, ConfigError
from submerge.io.outdir import write_files_atomically
from submerge.io.writer import save_tensors

log = logging.getLogger("submerge")

EXPERTS_FILE = "experts.safetensors"
MANIFEST_FILE = "experts.json"
FORMAT = "submerge-esmpp/1"
ROUTED_DEFAULT = "qkv,mlp_in"  # the authors' ViT code: attention QKV + MLP up-projection


@dataclass
class LayerExperts:
    """The experts of one routed linear: ``B [T, d_out, r]``, ``A [T, r, d_in]``, prototypes
    ``[T, d_in]``, optional bias residuals ``[T, d_out]``; ``layout`` of the module's weight."""

    B: torch.Tensor
    A: torch.Tensor
    prototypes: torch.Tensor
    bias: Optional[torch.Tensor] = None
    layout: str = "out_in"
    # an optional linear router (submerge.routing.routers): score_t = pooled input · router_w[t] + router_b[t]
    router_w: Optional[torch.Tensor] = None  # [T, d_in]
    router_b: Optional[torch.Tensor] = None  # [T]

    @property
    def n_params(self) -> int:
        return self.B.numel() + self.A.numel() + (self.bias.numel() if self.bias is not None else 0)


@dataclass
class ExpertSet:
    """All routed layers' experts, keyed by module path (the weight name without ``.weight``)."""

    tasks: list[str]
    rank: int
    layers: dict[str, LayerExperts] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        """Expert parameters (B, A, bias residuals); prototypes counted separately."""
        return sum(e.n_params for e in self.layers.values())

    @property
    def n_prototype_values(self) -> int:
        return sum(e.prototypes.numel() for e in self.layers.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self.layers.values()
                   for t in (e.B, e.A, e.prototypes, e.bias) if t is not None)

    def overhead(self, base_params: int, base_bytes: Optional[int] = None) -> dict:
        out = {"expert_params": self.n_params, "prototype_values": self.n_prototype_values,
               "expert_bytes": self.nbytes(),
               "params_pct_of_base": 100.0 * (self.n_params + self.n_prototype_values) / max(base_params, 1)}
        if base_bytes:
            out["bytes_pct_of_base"] = 100.0 * self.nbytes() / base_bytes
        return out

    # ------------------------------------------------------------------ saving
    def save(self, folder: Union[str, Path]) -> Path:
        """Write ``experts.safetensors`` + ``experts.json`` into ``folder`` (which must exist).

        Both files go to temporary names first and are renamed, so a failure leaves no half file."""
        folder = Path(folder)
        tensors: dict[str, torch.Tensor] = {}
        layers = {}
        for name, e in self.layers.items():
            tensors[f"{name}.B"] = e.B.contiguous()
            tensors[f"{name}.A"] = e.A.contiguous()
            tensors[f"{name}.prototypes"] = e.prototypes.contiguous()
            if e.bias is not None:
                tensors[f"{name}.bias"] = e.bias.contiguous()
            if e.router_w is not None:
                tensors[f"{name}.router_w"] = e.router_w.contiguous()
                tensors[f"{name}.router_b"] = e.router_b.contiguous()
            layers[name] = {"d_out": int(e.B.shape[1]), "d_in": int(e.A.shape[2]), "rank": int(e.B.shape[2]),
                            "bias": e.bias is not None, "layout": e.layout, "router": e.router_w is not None}
        manifest = {"format": FORMAT, "tasks": self.tasks, "rank": self.rank, "layers": layers, "info": self.info}
        text = json.dumps(manifest, indent=2) + "\n"
        write_files_atomically(folder, {EXPERTS_FILE: lambda p: save_tensors(tensors, p, "ESM++ experts", {"format": FORMAT}),
                                        MANIFEST_FILE: lambda p: p.write_text(text)})
        return folder

    @classmethod
    def load(cls, folder: Union[str, Path], device: Union[str, torch.device] = "cpu") -> "ExpertSet":
        folder = Path(folder)
        mpath, tpath = folder / MANIFEST_FILE, folder / EXPERTS_FILE
        if not mpath.exists() or not tpath.exists():
            raise CheckpointError(f"{folder} has no ESM++ experts ({MANIFEST_FILE} + {EXPERTS_FILE}); "
                                  f"merge with method esm_pp or save an ExpertSet there")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{mpath}: not valid JSON ({e})") from None
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        out = cls(list(manifest["tasks"]), int(manifest["rank"]), info=manifest.get("info", {}))
        with safe_open(str(tpath), framework="pt", device=str(device)) as f:
            keys = set(f.keys())
            for name, meta in manifest["layers"].items():
                router = bool(meta.get("router"))
                need = [f"{name}.B", f"{name}.A", f"{name}.prototypes"] + ([f"{name}.bias"] if meta["bias"] else [])
                need += [f"{name}.router_w", f"{name}.router_b"] if router else []
                missing = [k for k in need if k not in keys]
                if missing:
                    raise CheckpointError(f"{tpath}: missing tensor(s) {missing}")
                out.layers[name] = LayerExperts(f.get_tensor(need[0]), f.get_tensor(need[1]), f.get_tensor(need[2]),
                                                f.get_tensor(f"{name}.bias") if meta["bias"] else None,
                                                meta.get("layout", "out_in"),
                                                f.get_tensor(f"{name}.router_w") if router else None,
                                                f.get_tensor(f"{name}.router_b") if router else None)
        return out


# ---------------------------------------------------------------------------------- construction
def routed_roles(spec: str) -> set[str]:
    """Roles routed: a comma list of ESM roles (q,k,v,qkv,attn_out,mlp_in,mlp_out) or 'all'."""
    from submerge.layers import ROLES

    roles = {r.strip() for r in str(spec).split(",") if r.strip()}
    if roles == {"all"}:
        return set(ROLES)
    bad = roles - set(ROLES)
    if bad:
        raise ConfigError(f"routed: unknown role(s) {sorted(bad)}; use a comma list of {list(ROLES)} or 'all'")
    if "qkv" in roles:
        roles |= {"q", "k", "v"}
    return roles


def is_routed(name: str, roles: set[str], rules) -> bool:
    from submerge.layers import layer_role

    hit = layer_role(name, rules)
    return hit is not None and hit[0] in roles


def layer_experts(merged: torch.Tensor, finetuned: Sequence[torch.Tensor], stats: Sequence[Any], rank: int,
                  dtype: Optional[torch.dtype] = None) -> LayerExperts:
    """The experts of one linear weight: ``merged`` and each task's fine-tuned weight (stored layout),
    ``stats`` each task's :class:`~submerge.stats.gram.LayerStats` for this layer."""
    from submerge.stats.gram import essential_subspace

    dtype = dtype or merged.dtype
    layout = stats[0].layout
    dev = finetuned[0].device  # the math runs where the weights are; experts come back on the CPU
    m = stats[0].weight_as_out_in(merged).to(dev, torch.float64)
    d_out, d_in = m.shape
    r = min(rank, d_out)
    Bs, As, protos = [], [], []
    for w, st in zip(finetuned, stats):
        if st.d_in != d_in:
            raise CheckpointError(f"calibration statistics have d_in={st.d_in}, the weight has {d_in}")
        delta = st.weight_as_out_in(w).double() - m
        e, _ = essential_subspace(delta, st.gram, st.count, r)
        Bs.append(e)
        As.append(e.T @ delta)
        protos.append(st.mean.double())
    return LayerExperts(torch.stack(Bs).to("cpu", dtype), torch.stack(As).to("cpu", dtype),
                        torch.stack(protos).float(), None, layout)


def bias_residuals(merged: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[T, d_out]`` bias residuals ``b_t − b_merged`` (on the CPU, in the merged bias's dtype)."""
    m = merged.to("cpu", torch.float64)
    return torch.stack([f.to("cpu", torch.float64) - m for f in finetuned]).to(merged.dtype)


def build_experts(
    merged: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    stats: Sequence[Any],
    *,
    rank: int = 32,
    routed: str = ROUTED_DEFAULT,
    role_patterns: str = "",
    bias: bool = True,
    tasks: Optional[Sequence[str]] = None,
    dtype: Optional[torch.dtype] = None,
    prototype_stats: Optional[Sequence[Any]] = None,
) -> ExpertSet:
    """ESM++ experts from in-memory state dicts (the Python-API twin of merging with ``esm_pp``).

    ``merged`` is the static model the experts correct (ESM at its chosen alpha), ``models`` the
    fine-tuned experts, ``stats`` one calibration source per model (CalibrationStats or a folder).
    Layers whose role is routed but which lack statistics in some task are left unrouted (logged).
    ``prototype_stats``: per task, statistics whose mean inputs become the prototypes instead (e.g.
    collected in the merged model itself, which is what the router sees at inference)."""
    from submerge.layers import parse_role_patterns
    from submerge.stats.load import load_stats

    if len(stats) != len(models):
        raise ConfigError(f"build_experts: {len(models)} models but {len(stats)} calibration sources")
    if rank < 1:
        raise ConfigError(f"rank must be >= 1, got {rank}")
    stats = [load_stats(s) for s in stats]
    if prototype_stats is not None:
        if len(prototype_stats) != len(models):
            raise ConfigError(f"build_experts: {len(models)} models but {len(prototype_stats)} prototype sources")
        prototype_stats = [load_stats(s) for s in prototype_stats]
    roles, rules = routed_roles(routed), parse_role_patterns(role_patterns)
    tasks = list(tasks) if tasks is not None else [str(s.info.get("task", i)) if hasattr(s, "info") else str(i)
                                                   for i, s in enumerate(stats)]
    out = ExpertSet(tasks, rank, info={"routed": routed, "rank": rank, "bias": bias})
    skipped = []
    for name, w in merged.items():
        if not (w.is_floating_point() and w.dim() == 2 and name.endswith(".weight") and is_routed(name, roles, rules)):
            continue
        for i, sd in enumerate(models):
            if name not in sd:
                raise CheckpointError(f"model {i} has no tensor {name}")
        layer_stats = [s.lookup(name) for s in stats]
        if any(s is None for s in layer_stats):
            skipped.append(name)
            continue
        e = layer_experts(w, [sd[name] for sd in models], layer_stats, rank, dtype or w.dtype)
        if prototype_stats is not None:
            ps = [s.lookup(name) for s in prototype_stats]
            if any(p is None for p in ps):
                raise ConfigError(f"prototype_stats lack layer {name}")
            e.prototypes = torch.stack([p.mean.float() for p in ps])
        bname = name[: -len(".weight")] + ".bias"
        if bias and bname in merged:
            e.bias = bias_residuals(merged[bname], [sd[bname] for sd in models]).to(e.B.dtype)
        out.layers[name[: -len(".weight")]] = e
    if skipped:
        log.info("esm_pp: %d routed layer(s) without calibration statistics stay static: %s", len(skipped),
                 ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    if not out.layers:
        raise ConfigError(f"esm_pp: no layer matched the routed roles {sorted(roles)} with statistics; "
                          f"check `routed` and `role_patterns`")
    return out
