"""How each bench row is set: a method's default settings (its registry defaults, plus its paper's where mergekit's
default is a no-op), the post-merge rows (``<method>+lines``, ``<method>+surgery``), how its scale is searched and
which statistics it reads (from what each method declares in the registry).
"""

from __future__ import annotations

from typing import Optional, Sequence

from submerge.bench.session import BenchConfig, BenchSession
from submerge.errors import ConfigError
from submerge.methods import get_method, list_methods
from submerge.search import auto_search_kwargs

# Settings of the "default" row of each method: its registry defaults plus the values its paper
# recommends where the registry default (mergekit's) is a no-op.  weight = 1 for every expert.
PRESETS: dict[str, dict] = {
    "ties": {"density": 0.2},             # TIES paper: keep the top 20 %
    "magnitude_prune": {"density": 0.2},
    "dare_linear": {"density": 0.5},      # FusionBench default drop rate 0.5
    "dare_ties": {"density": 0.5},
    "breadcrumbs": {"density": 0.8, "gamma": 0.01},   # drop top 1 % and the bottom tail
    "breadcrumbs_ties": {"density": 0.8, "gamma": 0.01},
    "della": {"density": 0.5, "epsilon": 0.15},
    "della_linear": {"density": 0.5, "epsilon": 0.15},
}


# LiNeS rows (Wang et al., ICLR 2025): the method's update scaled by block depth, LiNeS' beta searched on val
# (the authors' grid), alpha by their norm rule.  Named "<method>+lines" in a bench's method list.
LINES_ROWS = ("task_arithmetic+lines", "tsv+lines", "esm+lines")


# Representation Surgery (Yang et al., ICML 2024) on the val-tuned merge of a method, modules trained on unlabeled
# val inputs: "<method>+surgery"
SURGERY_ROWS = ("task_arithmetic+surgery", "tsv+surgery", "esm+surgery")


# Settings read by one method only: they key that method's cached rows, not the others'
METHOD_SETTINGS = {"adamerging": ("adamerging_steps", "adamerging_lr"),
                   "esm_pp": ("esmpp_routers", "esmpp_per_token")}


def split_methods(text: str) -> list[str]:
    """A comma-separated list of bench rows, commas inside a variant's brackets kept:
    ``"ties,tsv[rank_tol=1e-4,embeddings=svd]"`` -> ``["ties", "tsv[rank_tol=1e-4,embeddings=svd]"]``."""
    out, cur, depth = [], "", 0
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [x.strip() for x in out + [cur] if x.strip()]


def row_overrides(name: str) -> dict:
    """The parameters a row name sets in brackets, typed and checked: ``"tsv[rank_tol=1e-4]"`` ->
    ``{"rank_tol": 1e-4}`` (a variant of the method's default row, e.g. for LoRA experts; its rows are labelled
    and cached by the whole name)."""
    head = name.partition("+")[0]
    if "[" not in head:
        return {}
    method, _, inner = head.partition("[")
    if not inner.endswith("]"):
        raise ConfigError(f"bench method {name!r}: write a variant as method[param=value,...]")
    m = get_method(method)
    out = {}
    for item in filter(None, (x.strip() for x in inner[:-1].split(","))):
        key, eq, value = (x.strip() for x in item.partition("="))
        if not eq or key not in m.param_names:
            raise ConfigError(f"bench method {name!r}: {item!r} is not param=value for a parameter of {method} "
                              f"({', '.join(m.param_names)})")
        out[key] = m.param(key).coerce(value, f"{name}: {key}")
    return out


def split_row_name(name: str) -> tuple[str, Optional[str]]:
    """A bench row name as (registered method, post-processing): ``"tsv+lines"`` -> ``("tsv", "lines")``,
    ``"tsv[rank_tol=1e-4]"`` -> ``("tsv", None)`` (its parameters: :func:`row_overrides`)."""
    method, _, post = name.partition("+")
    method = method.partition("[")[0]
    if post and post not in ("lines", "surgery"):
        raise ConfigError(f"unknown post-processing '+{post}' in bench method {name!r}; known: +lines, +surgery")
    if post and get_method(method).scale_param is None:
        raise ConfigError(f"{name}: +{post} rows need a method with a scale searched on val ({method} has none)")
    return method, post or None

def applicable_methods(n_models: int, names: Optional[Sequence[str]] = None) -> list[str]:
    """The bench rows to compute: ``names`` (checked) or every registered method plus the LiNeS rows."""
    rows = list(names) if names else [m.name for m in list_methods()] + list(LINES_ROWS) + list(SURGERY_ROWS)
    out = []
    for row in rows:
        m = get_method(split_row_name(row)[0])
        row_overrides(row)  # a bad variant is one line before anything runs
        if n_models < m.min_models or (m.max_models is not None and n_models > m.max_models):
            if names:
                raise ConfigError(f"{m.name} cannot merge {n_models} experts")
            continue
        out.append(row)
    return out

def row_params(row: str) -> dict:
    method = split_row_name(row)[0]
    m = get_method(method)
    p = {k: v for k, v in PRESETS.get(method, {}).items() if k in m.param_names}
    if "weight" in m.param_names:
        p["weight"] = 1.0
    return {**p, **row_overrides(row)}

def search_kwargs(cfg: BenchConfig, m) -> dict:
    """How a method's scale is searched: ``cfg.search == "full"``: as ``submerge tune``'s ``alpha: auto``
    (λ methods on ``cfg.lambda_grid``, α methods by their own strategy); ``coarse``: about 6 points (λ methods
    keep the grid)."""
    if m.scale_param != "lambda" and cfg.search == "coarse":
        return {"strategy": "coarse"}
    return auto_search_kwargs(m, cfg.lambda_grid)

def stats_for(S: BenchSession, method: str):
    m = get_method(split_row_name(method)[0])
    if not m.uses_stats(row_params(method)):
        return None
    return S.fisher() if m.stats_kind == "fisher" else S.calibration()


def tune_search(methods) -> list[dict]:
    """``submerge tune``'s search entries that reproduce the bench's val-tuned rows of ``methods``: each method's
    row settings with its scale searched (``auto``, the bench's own search)."""
    return [{"method": m, **row_params(m), get_method(m).scale_param: "auto"} for m in methods]
