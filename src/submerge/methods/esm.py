"""Data-based merging with calibration statistics: ESM (Essential Subspace Merging) and RegMean.

Both read, per task and per linear layer, the input second moment ``G_t = X_tᵀX_t`` that
``submerge calibrate`` (or :func:`submerge.stats.gram.collect_stats`) records.

ESM, per linear layer that gets the essential-subspace path (its "ESD keys"):

1. per task, the essential subspace: the top eigenvectors ``E_t`` of the (uncentred)
   covariance of the feature shift ``ΔO_t = X_t ΔW_tᵀ``, i.e. of ``ΔW_t G_t ΔW_tᵀ`` (Gram
   trick: no activations, and a d_in x d_in problem when d_out > d_in), rank
   ``r = ⌊rank_scale·d_out/T⌋``; the coordinates ``C_t = E_tᵀ ΔW_t``;
2. eigenvalue re-weighting ``s = (λ/mean λ)^eig_power`` (normalised to mean 1) on both
   factors, task polarisation ``(‖ΔW_t‖/mean‖ΔW‖)^task_power``, input-column
   polarisation ``(c_j/mean c)^column_power``;
3. fusion: ``polar`` (the authors: polar factors of the stacked E and C, each times its
   mean singular value, times ``factor``) or ``tsv`` (each task's rank-r essential
   approximation re-factorised and fused as TSV-M, keeping its singular values);
4. layer polarisation ``(‖ΔW_ℓ‖/mean_family‖ΔW‖)^layer_power`` within each layer family;
5. θ = θ_0 + α·ΔW on the ESD keys (``alpha_scope: esd``, the authors) or on every
   tensor (``alpha_scope: all``); the rest (TSV-M for other linears, the mean of task
   vectors for non-matrices) with coefficient 1 / α.

Steps 4 needs every layer's merged update first, so ESM runs a whole-model pass that
spills the unscaled ESD results (to the merge's scratch folder, or RAM in the Python
API) and records the per-layer norms; the per-tensor pass then only rescales.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from submerge.errors import ConfigError
from submerge.layers import ROLES, family_of, layer_role, parse_role_patterns
from submerge.methods.registry import ModelPass, Param, TensorContext, register_method
from submerge.methods.subspace import (drop_null, exact_svd, is_embedding, is_matrix, mean_of, polar, task_vectors,
                                      truncated_svds, tsv_merge)
from submerge.stats.gram import essential_subspace

log = logging.getLogger("submerge")

RECIPES: dict[str, dict[str, Any]] = {
    # ESM-ViT code (esm_utils.esm_merge): ESD on stacked QKV + both MLP linears, attention-out by TSV-M.
    "vit": dict(esd_roles="qkv,mlp_in,mlp_out", stack_qkv=True, eig_power=0.15, task_power=2.0,
                column_power=2.0, layer_power=2.0, factor=2.0, fusion="polar", alpha_scope="esd",
                rank_scale=1.0, other_fusion="tsv", keep_base="", embeddings="mean", rank_tol=0.0),
    # ESM-RoBERTa code (merge.py::esm + run_merge.py): ESD on all six linears, q/k/v separate, layer
    # polarisation only; every other 2-D tensor (embeddings included) by its TSV path, whose polar factors
    # are multiplied by their mean singular values; biases and the classifier excluded (kept from the base,
    # --exclude-param ".*classifier.*" ".*bias.*"); alpha scales every merged tensor (its scaling search
    # rescales the whole merged task vector).
    "glue": dict(esd_roles="q,k,v,attn_out,mlp_in,mlp_out", stack_qkv=False, eig_power=0.15, task_power=0.0,
                 column_power=0.0, layer_power=2.0, factor=1.0, fusion="polar", alpha_scope="all",
                 rank_scale=1.0, other_fusion="tsv_scaled", keep_base="classifier|bias", embeddings="svd",
                 rank_tol=0.0),
    # submerge's default, chosen on validation data by the ablation in benchmarks/results/esm_ablation/:
    # the essential-subspace truncation on all six linears, fused as TSV-M fuses (each task's spectrum
    # kept instead of the polar factors' mean), layer polarisation, alpha on every tensor.
    "essential_tsv": dict(esd_roles="q,k,v,attn_out,mlp_in,mlp_out", stack_qkv=False, eig_power=0.0,
                          task_power=0.0, column_power=0.0, layer_power=2.0, factor=1.0, fusion="tsv",
                          alpha_scope="all", rank_scale=1.0, other_fusion="tsv", keep_base="", embeddings="mean",
                          rank_tol=0.0),
}
DEFAULT_RECIPE = "essential_tsv"
RECIPE_BOUNDS = {"vit": (0.0, 2.0), "glue": (0.0, 5.0), "essential_tsv": (0.0, 5.0)}  # alpha search ranges


# ------------------------------------------------------------------------------ kernels
def _eig_weights(lam: torch.Tensor, power: float) -> torch.Tensor:
    if power == 0 or float(lam.mean()) <= 0:
        return torch.ones_like(lam)
    s = (lam / lam.mean()).pow(power)
    return s / s.mean()


def esm_merge_matrix(
    deltas: list[torch.Tensor],
    grams: list[torch.Tensor],
    counts: list[int],
    *,
    rank: Optional[int] = None,
    rank_scale: float = 1.0,
    eig_power: float = 0.15,
    task_power: float = 2.0,
    column_power: float = 2.0,
    factor: float = 2.0,
    fusion: str = "polar",
    rank_tol: float = 0.0,
) -> torch.Tensor:
    """ESM fusion of one (d_out x d_in, ``y = x Wᵀ``) matrix from T task updates and their input Grams.

    ``rank_tol > 0``: each task keeps only its essential directions whose feature-shift singular value is above
    ``rank_tol`` times the shift's Frobenius norm (``λ > rank_tol²·Σλ``), so an update of lower rank than r (a LoRA
    expert's) brings no arbitrary null-space directions into the fusion (see ``submerge.methods.subspace``).
    Returns the merged update before layer polarisation and α, in float64.
    """
    T = len(deltas)
    d_out, d_in = deltas[0].shape
    r = rank if rank is not None else max(1, int(rank_scale * d_out) // T)
    es, cs, norms = [], [], []
    for dw, g, n in zip(deltas, grams, counts):
        dw = dw.double()
        e, lam = essential_subspace(dw, g, n, r)
        if rank_tol > 0:  # the whole shift's energy: trace(ΔW G ΔWᵀ)/(n − 1), the sum of all its eigenvalues
            energy = float(((dw @ g.to(dw.device, torch.float64)) * dw).sum()) / max(n - 1, 1)
            # above the eigensolver's own resolution too: λ comes from an eigh of ΔW G ΔWᵀ (or MᵀM), whose null
            # eigenvalues are rounding of about eps·λ_max·d; rank_tol = 1e-8 sits there (σ ≈ √eps·σ_max), and on
            # an AMD EPYC such noise passed rank_tol² alone and moved rank-4 merges by 11–30% (issue 32)
            floor = float(lam.max()) * max(d_out, d_in) * torch.finfo(torch.float64).eps if len(lam) else 0.0
            keep = lam > max(rank_tol ** 2 * energy, floor)
            e, lam = e[:, keep], lam[keep]
        c = e.T @ dw
        nt = torch.linalg.norm(dw)
        norms.append(nt)
        if task_power:
            c = c * nt.pow(task_power)
        s = _eig_weights(lam, eig_power)
        es.append(e * s)
        cs.append(s[:, None] * c)
    widths = [e.shape[1] for e in es]  # r per task, fewer where rank_tol dropped null directions
    if sum(widths) == 0:
        return torch.zeros(d_out, d_in, dtype=torch.float64, device=deltas[0].device)
    e_cat, c_cat = torch.cat(es, 1), torch.cat(cs, 0)
    if task_power:
        mean_n = torch.stack(norms).mean()
        if float(mean_n) > 0:
            c_cat = c_cat / mean_n.pow(task_power)
    if column_power:
        col = torch.linalg.norm(c_cat, dim=0)
        if float(col.mean()) > 0:
            c_cat = c_cat * (col / col.mean()).pow(column_power)
    if fusion == "polar":
        e_o, s1 = polar(e_cat)
        c_o, s2 = polar(c_cat)
        return factor * (e_o * s1.mean()) @ (c_o * s2.mean())
    if fusion == "tsv":  # each task's essential approximation as an SVD, fused by TSV-M (spectrum kept)
        us, ss, vs = [], [], []
        for e_t, c_t in zip(e_cat.split(widths, 1), c_cat.split(widths, 0)):
            if e_t.shape[1] == 0:
                continue
            scale = torch.linalg.norm(e_t, dim=0)  # = s (E has orthonormal columns)
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            u_m, s_m, vh_m = exact_svd(scale[:, None] * c_t)
            us.append((e_t / safe) @ u_m)
            ss.append(s_m)
            vs.append(vh_m)
        u_o, _ = polar(torch.cat(us, 1))
        vh_o, _ = polar(torch.cat(vs, 0))
        return factor * (u_o * torch.cat(ss)) @ vh_o
    raise ConfigError(f"unknown ESM fusion {fusion!r}; use 'polar' or 'tsv'")


def tsv_scaled_merge(deltas: list[torch.Tensor], rank_tol: float = 0.0) -> torch.Tensor:
    """The ESM-RoBERTa code's TSV path (``merge.py::_tsv_process_2d_param``) for matrices outside the
    essential-subspace path: per task the top k = max(1, ⌊min(m, n)/T⌋) SVD triplets, stacked; the
    stacked U and V replaced by their polar factors *times their mean singular value* (its
    ``_procrustes_orthogonalize``); ΔW = U_o diag(S_cat) V_o.  Unlike TSV-M (no rescaling, rank 0 when
    min(m, n) < T) — kept as a separate kernel so the ``glue`` recipe is exactly the authors'.  ``rank_tol``: as
    TSV-M's."""
    m, n = deltas[0].shape
    T = len(deltas)
    k = max(1, min(m, n) // T)
    us, ss, vs = zip(*drop_null(truncated_svds([d.double() for d in deltas], k), deltas, rank_tol))
    if sum(len(x) for x in ss) == 0:
        return torch.zeros_like(deltas[0], dtype=torch.float64)
    u_o, su = polar(torch.cat(us, 1))
    v_o, sv_ = polar(torch.cat(vs, 0))
    return ((u_o * su.mean()) * torch.cat(ss)) @ (v_o * sv_.mean())


OTHER_FUSIONS = {"tsv": tsv_merge, "tsv_scaled": tsv_scaled_merge}


def _is_other_matrix(name: str, x: torch.Tensor, cfg: dict) -> bool:
    """Whether a tensor outside the essential-subspace path gets the recipe's matrix rule: TSV-M's
    rule (2-D, both sides > 1, embeddings by name only with embeddings=svd), or for the authors'
    RoBERTa path every 2-D tensor (their code sends every 2-D parameter through it)."""
    if cfg["other_fusion"] == "tsv_scaled":
        return x.dim() == 2 and (cfg["embeddings"] == "svd" or not is_embedding(name))
    return is_matrix(name, x, cfg["embeddings"])


def _kept_from_base(name: str, cfg: dict) -> bool:
    rx = cfg.get("_keep_rx")
    return rx is not None and rx.search(name) is not None


# ------------------------------------------------------------------------------ the method
class Spill:
    """Unscaled per-tensor results between the whole-model pass and the per-tensor pass:
    files in a scratch folder when the executor gives one, else RAM."""

    def __init__(self, folder: Optional[Path]):
        self.folder = Path(folder) if folder is not None else None
        self._ram: dict[str, torch.Tensor] = {}
        self._files: dict[str, Path] = {}
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    @classmethod
    def union(cls, spills: list["Spill"]) -> "Spill":
        """One spill holding every result of ``spills`` (their files stay where they were written)."""
        if len(spills) == 1:
            return spills[0]
        out = cls(None)
        for sp in spills:
            out._ram.update(sp._ram)
            out._files.update(sp._files)
        return out

    def put(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().to("cpu")  # spilled results wait on the CPU (or disk), not on an accelerator
        if self.folder is None:
            self._ram[name] = x
            return
        path = self.folder / f"{len(self._files):06d}.safetensors"
        from safetensors.torch import save_file

        save_file({"t": x.contiguous()}, str(path))
        self._files[name] = path

    def __contains__(self, name: str) -> bool:
        return name in self._ram or name in self._files

    def get(self, name: str) -> torch.Tensor:
        if name in self._ram:
            return self._ram[name]
        from safetensors.torch import load_file

        return load_file(str(self._files[name]))["t"]


@dataclass
class ESMPart:
    """What :func:`_esm_part` computed on some whole layers: the unscaled results (spilled), and per merged matrix
    (or stacked q/k/v group) its Frobenius norm, keyed ``family@first member``."""

    results: Spill
    esd: set = field(default_factory=set)
    fallback: list = field(default_factory=list)
    norms: dict[str, float] = field(default_factory=dict)
    norm_key: dict[str, str] = field(default_factory=dict)


@dataclass
class ESMState:
    results: Spill
    beta: dict[str, float] = field(default_factory=dict)
    esd: set = field(default_factory=set)
    fallback: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)


def resolve_recipe(params: dict) -> dict:
    """The recipe's constants, overridden by every explicitly given (non-None) parameter."""
    out = dict(RECIPES[params["recipe"]])
    for k in out:
        if params.get(k) is not None:
            out[k] = params[k]
    roles = [r.strip() for r in str(out["esd_roles"]).split(",") if r.strip()]
    if roles == ["all"]:
        roles = list(ROLES)
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise ConfigError(f"esd_roles: unknown role(s) {bad}; use a comma list of {list(ROLES)} or 'all'")
    roles = set(roles)
    try:
        out["_keep_rx"] = re.compile(out["keep_base"]) if out["keep_base"] else None
    except re.error as e:
        raise ConfigError(f"keep_base: bad regex {out['keep_base']!r} ({e})") from None
    if "qkv" in roles:  # "qkv" means the attention input projections, fused (ViT in_proj) or separate (BERT)
        roles |= {"q", "k", "v"}
    if {"q", "k", "v"} & roles:
        roles.add("qkv")
    out["esd_roles"] = roles
    return out


def _stats_ready(stats) -> bool:
    return stats is not None and len(stats) > 0 and all(s is not None for s in stats)


def _esm_part(mp: ModelPass, g: dict) -> ESMPart:
    """ESM's whole-model pass over the tensors of ``mp`` (whole layers): every essential-subspace and other matrix
    merged, unscaled, and spilled; the layer norms for :func:`_esm_combine`."""
    cfg = resolve_recipe(g)
    rules = parse_role_patterns(g.get("role_patterns") or "")
    done = ESMPart(Spill(mp.scratch_dir))
    norms = done.norms  # "family@first member" -> Frobenius norm of the merged matrix
    norm_key = done.norm_key  # tensor -> its key in norms (a stacked group shares one)
    pending: dict[str, dict[str, tuple[str, list, list]]] = {}

    def finish(names: list[str], deltas_list: list[list[torch.Tensor]], stats_list, family: str, esd: bool):
        """Merge one matrix (or a stacked q/k/v group) and spill its parts."""
        if esd:
            layout = stats_list[0][0].layout
            stacked = [torch.cat([stats_list[0][t].weight_as_out_in(deltas_list[j][t])
                                  for j in range(len(names))], 0) for t in range(len(mp.model_names))]
            grams = [st.gram for st in stats_list[0]]
            counts = [st.count for st in stats_list[0]]
            merged = esm_merge_matrix(
                stacked, grams, counts, rank_scale=cfg["rank_scale"], eig_power=cfg["eig_power"],
                task_power=cfg["task_power"], column_power=cfg["column_power"], factor=cfg["factor"],
                fusion=cfg["fusion"], rank_tol=cfg["rank_tol"],
            ).to(stacked[0].dtype)  # the compute dtype: float64 stays float64
            parts = merged.split([stats_list[0][0].weight_as_out_in(d[0]).shape[0] for d in deltas_list], 0)
            key = family + "@" + names[0]
            for name, part in zip(names, parts):
                done.results.put(name, (part.T if layout == "in_out" else part).contiguous())
                done.esd.add(name)
                norm_key[name] = key
            norms[key] = float(torch.linalg.norm(merged))
        else:
            for name, deltas in zip(names, deltas_list):
                merged = OTHER_FUSIONS[cfg["other_fusion"]](deltas, rank_tol=cfg["rank_tol"]).to(deltas[0].dtype)
                done.results.put(name, merged.contiguous())
                norm_key[name] = family + "@" + name
                norms[norm_key[name]] = float(torch.linalg.norm(merged))

    for name, tensors, base, _params in mp:
        if base is None or _kept_from_base(name, cfg) or not _is_other_matrix(name, tensors[0], cfg):
            continue
        hit = layer_role(name, rules)
        if hit is None:
            continue
        role, m = hit
        deltas = [t.sub_(base) for t in tensors]
        stats = mp.stats(name)
        ready = _stats_ready(stats) and all(
            st.d_in == st.weight_as_out_in(deltas[i]).shape[1] for i, st in enumerate(stats))
        wants = role in cfg["esd_roles"]
        if wants and not ready:
            done.fallback.append(name)
        if role in ("q", "k", "v") and cfg["stack_qkv"] and wants and ready:
            group = name[:m.start()] + "<qkv>"
            pending.setdefault(group, {})[role] = (name, deltas, stats)
            if len(pending[group]) == 3:
                parts = [pending[group][r] for r in ("q", "k", "v")]
                del pending[group]
                finish([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts],
                       family_of(group), True)
            continue
        finish([name], [deltas], [stats], family_of(name), wants and ready)
    for group, parts in pending.items():  # incomplete q/k/v groups: each on its own
        for role, (name, deltas, stats) in parts.items():
            finish([name], [deltas], [stats], family_of(name), True)
    return done


def _esm_combine(parts: list[ESMPart], g: dict) -> ESMState:
    """The parts of one model's pass joined, and layer polarisation within each family: a matrix's scale is
    ``(‖ΔW_ℓ‖ / mean over its family) ^ layer_power``.  The family means are exactly rounded sums
    (``math.fsum``), so they do not depend on how the layers were split into parts."""
    cfg = resolve_recipe(g)
    state = ESMState(Spill.union([p.results for p in parts]), settings=cfg)
    norms: dict[str, float] = {}
    norm_key: dict[str, str] = {}
    for p in parts:
        state.esd |= p.esd
        state.fallback += p.fallback
        norms.update(p.norms)
        norm_key.update(p.norm_key)
    if cfg["layer_power"]:
        by_fam: dict[str, list[float]] = {}
        for key, nrm in norms.items():
            by_fam.setdefault(key.split("@", 1)[0], []).append(nrm)
        mean = {fam: math.fsum(v) / len(v) for fam, v in by_fam.items()}
        for name, key in norm_key.items():
            m = mean[key.split("@", 1)[0]]
            state.beta[name] = (norms[key] / m) ** cfg["layer_power"] if m > 0 else 1.0
    if state.fallback:
        log.warning("esm: %d layer(s) without usable calibration statistics use TSV-M: %s",
                    len(state.fallback), ", ".join(state.fallback[:6]) + (" ..." if len(state.fallback) > 6 else ""))
    return state


def _esm_prepare(mp: ModelPass, g: dict) -> ESMState:
    return _esm_combine([_esm_part(mp, g)], g)


_ESM_PARAMS = [
    Param("alpha", float, 1.0, help="global scale (on the ESD layers only when alpha_scope=esd)"),
    Param("recipe", str, DEFAULT_RECIPE, choices=tuple(RECIPES), help="preset of every constant below"),
    Param("esd_roles", str, None, help="comma list of roles given the essential-subspace path, or 'all'"),
    Param("stack_qkv", bool, None, help="one ESD over the stacked [q; k; v] (as ViT's in_proj)"),
    Param("eig_power", float, None, low=0.0, help="eigenvalue re-weighting exponent"),
    Param("task_power", float, None, low=0.0, help="task polarisation exponent (0 = off)"),
    Param("column_power", float, None, low=0.0, help="input-column polarisation exponent (0 = off)"),
    Param("layer_power", float, None, low=0.0, help="layer polarisation exponent (0 = off)"),
    Param("factor", float, None, help="constant factor on the fused ESD update"),
    Param("fusion", str, None, choices=("polar", "tsv"), help="polar (authors) or tsv (keep spectrum)"),
    Param("alpha_scope", str, None, choices=("esd", "all"), help="which tensors alpha scales"),
    Param("rank_scale", float, None, low=0.0, help="rank per task = floor(rank_scale * d_out / T)"),
    Param("role_patterns", str, "", help="role overrides 'role=regex;...' (roles q,k,v,qkv,attn_out,mlp_in,mlp_out)"),
    Param("embeddings", str, None, choices=("mean", "svd"), help="embedding tables: mean or the matrix rule"),
    Param("other_fusion", str, None, choices=tuple(OTHER_FUSIONS),
          help="matrices outside the ESD path: tsv (TSV-M) or tsv_scaled (the authors' RoBERTa TSV path)"),
    Param("keep_base", str, None, help="regex on tensor names kept from the base, unmerged (glue: classifier|bias)"),
    Param("rank_tol", float, None, low=0.0, high=1.0,
          help="drop essential / singular directions at most rank_tol x the update's norm (numerically zero: an "
               "arbitrary null-space basis when an update's rank is below r, as LoRA experts'); 0 (every "
               "recipe) keeps them, as the authors' code"),
]


# How the executor drives ESM (shared by esm_pp, whose merged tensors are ESM's).
ESM_MACHINERY: dict[str, Any] = dict(
    needs_base=True,
    min_models=1,
    prepare=_esm_prepare,
    prepare_part=_esm_part,
    prepare_combine=_esm_combine,
    scale_param="alpha",
    needs_stats=True,
    search={"bounds": lambda p: RECIPE_BOUNDS.get(p.get("recipe", DEFAULT_RECIPE), (0.0, 2.0))},
)


@register_method(
    name="esm",
    pretty_name="ESM (Essential Subspace Merging)",
    paper="Li, Qi, Tian, Geng, Model Merging in the Essential Subspace, CVPR 2026; code github.com/kiddo127/ESM",
    url="https://arxiv.org/abs/2602.20208",
    variant="Default recipe=essential_tsv (submerge's, chosen on validation: see benchmarks/results/esm_ablation): "
            "ESD truncation of all six attention/MLP linears at rank floor(d_out/T), fused as TSV-M (stacked "
            "bases replaced by polar factors, each task's essential spectrum kept), layer polarisation ^2, alpha "
            "on every tensor (searched on [0,5]). The authors' two code paths are presets: recipe=vit (ESM-ViT/esm_utils.esm_merge): ESD on stacked "
            "QKV and both MLP linears at rank floor(d_out/T), eigenvalue weights ^0.15, task/column/layer "
            "polarisation ^2, polar fusion x mean singular value, x2; attention-out by TSV-M; alpha on ESD "
            "layers only (searched on [0,2]). recipe=glue (ESM-RoBERTa merge.py::esm + run_merge.py): ESD on all six "
            "linears, q/k/v separate, layer polarisation only, no x2; every other 2-D tensor (embeddings "
            "included) by the authors' TSV path (polar factors x their mean singular values, rank max(1, "
            "floor(min/T))); biases and classifier kept from the base; alpha on every merged tensor (searched "
            "on [0,5]). Statistics from each "
            "task's fine-tuned model (submerge calibrate). Non-matrices: mean of task vectors; layers without "
            "statistics: TSV-M (logged). Default alpha=1.",
    params=_ESM_PARAMS,
    **ESM_MACHINERY,
)
def esm(ctx: TensorContext, **p: Any) -> torch.Tensor:
    st: ESMState = ctx.state
    alpha = p["alpha"]
    cfg = st.settings
    scope = cfg["alpha_scope"]
    base = ctx.base
    if _kept_from_base(ctx.name, cfg):
        return base
    if ctx.name in st.results:
        dw = st.results.get(ctx.name).to(base.device, base.dtype) * st.beta.get(ctx.name, 1.0)
        coef = alpha if (ctx.name in st.esd or scope == "all") else 1.0
        return base.add_(dw, alpha=coef) if coef != 0 else base
    coef = alpha if scope == "all" else 1.0
    if coef == 0:
        return base
    deltas = task_vectors(ctx)
    if _is_other_matrix(ctx.name, deltas[0], cfg):
        merged = OTHER_FUSIONS[cfg["other_fusion"]](deltas, rank_tol=cfg["rank_tol"]).to(base.dtype)
    else:
        merged = mean_of(deltas)
    return base.add_(merged, alpha=coef)


@register_method(
    name="regmean",
    pretty_name="RegMean (regression mean)",
    paper="Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023",
    url="https://arxiv.org/abs/2212.09849",
    variant="Closed form per linear layer, as FusionBench: G_t = X_t^T X_t / N_t from task t's own model, "
            "off-diagonals scaled by reduce_non_diagonal_ratio (default 0.95), W = (sum G_t)^-1 sum G_t W_t "
            "(d_in x d_out orientation). Other tensors and layers without statistics: plain average.",
    params=[Param("reduce_non_diagonal_ratio", float, 0.95, low=0.0, high=1.0,
                  help="scale of the Gram matrices' off-diagonal entries")],
    needs_stats=True,
    inputs_read_only=True,
)
def regmean(ctx: TensorContext, *, reduce_non_diagonal_ratio: float) -> torch.Tensor:
    tensors, stats = ctx.tensors, ctx.stats
    w0 = tensors[0]
    if w0.dim() == 2 and _stats_ready(stats) and all(
            s.d_in == s.weight_as_out_in(w).shape[1] for s, w in zip(stats, tensors)):
        rho = reduce_non_diagonal_ratio
        g_sum, gw_sum = None, None
        for s, w in zip(stats, tensors):
            g = s.gram.to(w0.device, torch.float64) / max(s.count, 1)
            g = rho * g + (1 - rho) * torch.diag(torch.diagonal(g))
            gw = g @ s.weight_as_out_in(w).double().T  # [d_in, d_out]
            g_sum = g if g_sum is None else g_sum + g
            gw_sum = gw if gw_sum is None else gw_sum + gw
        try:
            sol = torch.linalg.solve(g_sum, gw_sum)
        except RuntimeError:  # singular: a tiny ridge
            eye = torch.eye(g_sum.shape[0], dtype=g_sum.dtype, device=g_sum.device)
            sol = torch.linalg.solve(g_sum + 1e-8 * torch.diagonal(g_sum).mean() * eye, gw_sum)
        out = sol.T
        return (out.T if stats[0].layout == "in_out" else out).to(w0.dtype).contiguous()
    return mean_of(list(tensors))
