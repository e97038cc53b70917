"""The ``submerge tune`` configuration: a merge config (without ``merge_method``) plus what to search,
how to score each task on validation data, and what to maximise.

.. code-block:: yaml

    base_model: base
    models:
      - model: experts/sentiment
        name: sentiment                  # the task's name (default: the folder's name)
        calibrate: {inputs: data/sentiment.calib.jsonl}   # only computed if a candidate needs it
      - model: experts/topic
        name: topic
        calibration: stats/topic         # or an existing `submerge calibrate` folder
    calibrate: {n: 32, max_length: 64}   # defaults of every model's calibrate block
    search:
      - method: task_arithmetic          # lambda: auto (the default for a method with a scale)
      - method: ties
        density: [0.1, 0.2, 0.4]         # searched (a list)
        lambda: {range: [0.2, 1.0], step: 0.2}   # searched (a grid)
      - method: tsv
        alpha: auto                      # search_alpha's search, continued past the upper edge
    eval:
      scorer: classification             # or lm_loss, or {python: module:function}
      max_length: 64
      tasks:
        sentiment: {data: data/sentiment.val.jsonl}
        topic: {data: data/topic.val.jsonl, label_field: topic}
    objective: mean                      # mean normalised score; or worst; or {weighted: {sentiment: 2}}

Every check that needs no model (keys, methods, parameters, files, fields, scorer imports) happens when
the file is read, before anything is loaded.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from submerge.engine.config import MergeConfig, load_yaml_text, parse_config, refuse_nul
from submerge.errors import ConfigError, quoted, suggest
from submerge.evaluate.tasks import eval_tasks, known_keys, resolve_ref

TUNE_KEYS = ("search", "eval", "objective", "calibrate", "fisher")
MODEL_KEYS = ("name", "calibrate", "fisher")
CALIBRATE_KEYS = {"inputs": None, "n": 32, "max_length": 128, "batch_size": 8, "seed": 0, "field": None,
                  "layers": None}
FISHER_KEYS = {"inputs": None, "n": 256, "kind": "true", "label_field": None, "field": None, "max_length": 128,
               "seed": 0}
STRATEGIES = ("auto", "grid", "golden", "coarse", "cma")
# strategy: cma — CMA-ES over per-model parameters (mergekit-evolve's genome); its settings and defaults
CMA_KEYS = {"genome": None, "layer_points": 1, "evaluations": 32, "time": None, "population": None, "sigma": 0.3}


@dataclass
class StatsJob:
    """One model's statistics: an existing folder, or how to compute them (``spec``)."""

    kind: str  # "calibration" or "fisher"
    folder: Optional[Path] = None
    spec: Optional[dict] = None


@dataclass
class ModelEntry:
    name: str
    ref: str
    parameters: dict
    stats: dict[str, StatsJob] = field(default_factory=dict)


@dataclass
class Candidate:
    """One unit of the sweep: a method with fixed parameters and how its scale is chosen.

    ``scale``: None (the method has no scale, or it is fixed in ``params``), ``"auto"`` (search_alpha),
    or a list of values evaluated along the affine path."""

    index: int
    method: str
    params: dict
    scale_param: Optional[str] = None
    scale: Union[None, str, list] = None
    strategy: str = "auto"
    lines: Optional[dict] = None  # LiNeS on the method's update: {"alpha": a} fixed, beta is the scale (or fixed)
    learn: Optional[dict] = None  # AdaMerging learned on the tasks' unlabeled eval inputs (its settings)
    evolve: Optional[dict] = None  # strategy cma: the genome (per-model parameter -> bounds) and the budget
    model_params: Optional[list[dict]] = None  # per-model parameters set by the search (a CMA-ES point)

    @property
    def label(self) -> str:
        if self.evolve is not None:
            shown = {**self.params, **{k: f"cma{list(v)}" for k, v in self.evolve["genome"].items()}}
            return f"{self.method}(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")"
        if self.learn is not None:
            return f"{self.method}(" + ", ".join(f"{k}={v}" for k, v in self.learn.items()) + ")"
        shown = dict(self.params)
        if self.lines is not None:
            shown = {**shown, **{f"lines.{k}": v for k, v in self.lines.items()}}
        if self.scale_param and self.scale is not None:
            key = "lines.beta" if self.lines is not None else self.scale_param
            shown[key] = self.scale if self.scale == "auto" else "[" + ",".join(
                format(a, "g") for a in self.scale) + "]"
        inner = ", ".join(f"{k}={v}" for k, v in shown.items())
        return f"{self.method}({inner})" if inner else self.method


@dataclass
class TuneSpec:
    merge: dict  # the merge config without merge_method (raw dict, paths as written)
    models: list[ModelEntry]
    candidates: list[Candidate]
    tasks: list  # TaskData, one per model, in model order
    objective: dict
    config_dir: Path
    raw: dict

    @property
    def task_names(self) -> list[str]:
        return [m.name for m in self.models]

    def stats_kinds(self) -> set[str]:
        from submerge.methods import get_method

        kinds = set()
        for c in self.candidates:
            if c.learn is not None:
                continue
            m = get_method(c.method)
            mp = [dict(e.parameters) for e in self.models]
            if c.evolve is not None:  # any point of the genome (the statistics a method uses do not depend on it)
                mp = [p | {k: (b[0] + b[1]) / 2 for k, b in c.evolve["genome"].items()} for p in mp]
            if m.uses_stats(m.bind(c.params, mp)):
                kinds.add(m.stats_kind)
        return kinds

    def merge_config(self, method: str, params: dict, stats_folders: Optional[dict[str, Path]] = None,
                     model_params: bool = True, lines: Optional[dict] = None,
                     overrides: Optional[list[dict]] = None) -> MergeConfig:
        """The merge config of one candidate (absolute paths), as written beside the tuned model
        (``model_params=False``: without per-model parameters, to plan reading the checkpoints; ``overrides``:
        per-model parameters a search set, over the config's own)."""
        raw = {k: v for k, v in self.merge.items() if k != "models"}
        raw["merge_method"] = method
        if params:
            raw["parameters"] = {**(raw.get("parameters") or {}), **params}
        models = []
        for entry, mdl in zip(self.models, self.merge["models"]):
            mdl = {k: v for k, v in mdl.items() if k != "calibration" and (model_params or k != "parameters")}
            if stats_folders and entry.name in stats_folders:
                mdl["calibration"] = str(stats_folders[entry.name])
            if overrides is not None:
                mdl["parameters"] = {**(mdl.get("parameters") or {}), **overrides[len(models)]}
            models.append(mdl)
        raw["models"] = models
        if lines is not None:
            raw["lines"] = dict(lines)
        return parse_config(raw, "tune winner")


MAX_GRID = 10_000  # values one searched parameter may take
MAX_CANDIDATES = 100_000  # candidates one search may list (each is at least one merge)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _values(name: str, v: Any, where: str) -> Union[str, list, Any]:
    """A search value: a scalar (fixed), a list (searched), {range: [lo, hi], step|steps} (searched) or auto.
    A grid or list longer than :data:`MAX_GRID` values, or with a non-finite bound or step, is refused before
    any value is made."""
    if isinstance(v, dict):
        bad = set(v) - {"range", "step", "steps"}
        if bad or "range" not in v or ("step" in v) == ("steps" in v):
            raise ConfigError(f"{where}: {name}: a grid is {{range: [low, high], step: S}} or "
                              f"{{range: [low, high], steps: N}}, got {quoted(v)}")
        lo, hi = v["range"] if isinstance(v["range"], list) and len(v["range"]) == 2 else (None, None)
        if not all(_number(x) for x in (lo, hi)) or hi < lo:
            raise ConfigError(f"{where}: {name}: range must be [low, high], finite numbers, got {quoted(v['range'])}")
        if "steps" in v:
            n = v["steps"]
            if type(n) is not int or n < 1:
                raise ConfigError(f"{where}: {name}: steps must be a positive integer, got {quoted(n)}")
            if n > MAX_GRID:
                raise ConfigError(f"{where}: {name}: {n} steps; a grid takes at most {MAX_GRID} values")
            return [round(lo + (hi - lo) * i / max(n - 1, 1), 10) for i in range(n)] if n > 1 else [lo]
        step = v["step"]
        if not _number(step) or step <= 0:
            raise ConfigError(f"{where}: {name}: step must be a positive finite number, got {quoted(step)}")
        k = (hi - lo) / step
        if not k < MAX_GRID:
            raise ConfigError(f"{where}: {name}: range {quoted(v['range'])} with step {step:g} makes "
                              f"{k + 1:.3g} values; a grid takes at most {MAX_GRID} (use a larger step)")
        k = int(round(k + 1e-9))
        return [round(lo + step * i, 10) for i in range(k + 1)]
    if isinstance(v, list):
        if not v:
            raise ConfigError(f"{where}: {name}: an empty list")
        if len(v) > MAX_GRID:
            raise ConfigError(f"{where}: {name}: a list of {len(v)} values; a search takes at most {MAX_GRID}")
        return list(v)
    return v


def _candidates(search: Any, model_params: list[dict]) -> list[Candidate]:
    from submerge.methods import get_method, list_methods

    if not isinstance(search, list) or not search:
        raise ConfigError("search: give a list of methods, e.g. [{method: ties, density: [0.2, 0.4]}]")
    n_models = len(model_params)
    out: list[Candidate] = []
    for i, entry in enumerate(search):
        where = f"search[{i}]"
        if isinstance(entry, str):
            entry = {"method": entry}
        if not isinstance(entry, dict) or "method" not in entry:
            raise ConfigError(f"{where}: each entry names a method (method: ties)")
        name = entry["method"]
        try:
            m = get_method(name)
        except ConfigError:
            raise ConfigError(f"{where}: unknown method {name!r}"
                              f"{suggest(str(name), [x.name for x in list_methods()])}") from None
        if n_models < m.min_models or (m.max_models is not None and n_models > m.max_models):
            raise ConfigError(f"{where}: {name} cannot merge {n_models} models")
        if m.evaluation == "learned" and "coefficients" not in entry:  # learned here, from the eval texts
            for learn in _adamerging_entries(entry, where):
                out.append(Candidate(len(out), name, {}, None, None, "learn", learn=learn))
            continue
        strategy = entry.get("strategy", "auto")
        if strategy not in STRATEGIES:
            raise ConfigError(f"{where}: strategy {strategy!r}{suggest(str(strategy), STRATEGIES)}; use one of "
                              f"{list(STRATEGIES)}")
        if strategy == "cma":
            out.append(_cma_candidate(len(out), m, entry, model_params, where))
            continue
        extra = [k for k in CMA_KEYS if k in entry]
        if extra:
            raise ConfigError(f"{where}: {extra[0]} is a setting of strategy: cma")
        params = {k: v for k, v in entry.items() if k not in ("method", "strategy", "lines")}
        lines = _lines_entry(entry.get("lines"), m, params, where) if "lines" in entry else None
        for k in params:
            if k not in m.param_names:
                raise ConfigError(f"{where}: {name} has no parameter {k!r}{suggest(k, m.param_names)}; "
                                  f"its parameters: {sorted(m.param_names)}")
        scale = None
        if lines is not None:
            scale = lines.pop("beta")
            if not isinstance(scale, (str, list)):
                lines["beta"], scale = scale, None
        elif m.scale_param is not None:
            scale = _values(m.scale_param, params.pop(m.scale_param, "auto"), where)
            if isinstance(scale, str):
                if scale != "auto":
                    raise ConfigError(f"{where}: {m.scale_param}: {scale!r} — give a number, a list, a range or auto")
            elif not isinstance(scale, list):
                params[m.scale_param] = scale
                scale = None
        for k, v in params.items():
            if v == "auto":
                raise ConfigError(f"{where}: {k}: auto is for the method's scale ({m.scale_param or 'none'}) only")
        grid = {k: _values(k, v, where) for k, v in params.items()}
        searched = [k for k, v in grid.items() if isinstance(v, list)]
        size = math.prod(len(grid[k]) for k in searched)
        if len(out) + size > MAX_CANDIDATES:
            raise ConfigError(f"{where}: the search lists {len(out) + size:,} candidates; at most "
                              f"{MAX_CANDIDATES:,} (each is a merge): search fewer values")
        for combo in itertools.product(*[grid[k] for k in searched]):
            p = {**grid, **dict(zip(searched, combo))}
            try:
                m.bind({**p, **({m.scale_param: 1.0} if m.scale_param and m.scale_param not in p else {})},
                       [dict(mp) for mp in model_params])
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            out.append(Candidate(len(out), name, p, "beta" if lines is not None else m.scale_param, scale, strategy,
                                 dict(lines) if lines is not None else None))
    return out


def _cma_candidate(index: int, m, entry: dict, model_params: list[dict], where: str) -> Candidate:
    """``{method, strategy: cma, genome: {weight: [0, 1], density: [0.1, 1]}, layer_points, evaluations, time,
    population, sigma, <fixed parameters>}``: every model's genome parameters searched by CMA-ES within their
    bounds, each as ``layer_points`` values interpolated over the layers (1: one value per model)."""
    settings = {k: entry.get(k, d) for k, d in CMA_KEYS.items()}
    genome = settings["genome"]
    per_model = {p.name for p in m.params if p.per_model}
    if not isinstance(genome, dict) or not genome:
        raise ConfigError(f"{where}: strategy cma searches a genome: give genome: {{parameter: [low, high]}} with "
                          f"per-model parameters of {m.name} ({', '.join(sorted(per_model)) or 'none'})")
    for k, bounds in genome.items():
        if k not in per_model:
            raise ConfigError(f"{where}: genome: {k!r} is not a per-model parameter of {m.name}"
                              f"{suggest(str(k), per_model)}; these are: {sorted(per_model)}")
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(_number(b) for b in bounds)
                and math.isfinite(bounds[0]) and math.isfinite(bounds[1]) and bounds[0] < bounds[1]):
            raise ConfigError(f"{where}: genome: {k}: give [low, high] with low < high, got {quoted(bounds)}")
    for key, low in (("layer_points", 1), ("evaluations", 1), ("population", 2)):
        v = settings[key]
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not low <= v <= 100_000):
            raise ConfigError(f"{where}: {key} must be an integer from {low} to 100000, got {quoted(v)}")
    for key in ("time", "sigma"):
        v = settings[key]
        if v is not None and (not _number(v) or not 0 < v < math.inf):
            raise ConfigError(f"{where}: {key} must be a positive number, got {quoted(v)}")
    params = {k: v for k, v in entry.items() if k not in ("method", "strategy", *CMA_KEYS)}
    for k, v in params.items():
        if k not in m.param_names:
            raise ConfigError(f"{where}: {m.name} has no parameter {k!r}{suggest(k, m.param_names)}")
        if k in genome:
            raise ConfigError(f"{where}: {k} is in the genome and fixed at once")
        if isinstance(v, (list, dict, str)) and not isinstance(v, bool):
            raise ConfigError(f"{where}: {k}: strategy cma searches only the genome; fix the other parameters")
    if m.scale_param is not None and m.scale_param not in params:
        params[m.scale_param] = 1.0
    mid = [dict(mp) | {k: (b[0] + b[1]) / 2 for k, b in genome.items()} for mp in model_params]
    try:
        m.bind(params, mid)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return Candidate(index, m.name, params, None, None, "cma", evolve=settings)


# AdaMerging learned by tune: its settings, defaults (the paper's, batch 16 as its code) and checks
ADAMERGING_LEARN = {"granularity": "layer", "plus": False, "steps": 500, "lr": 1e-3, "init": 0.3, "batch_size": 16,
                    "ties_density": 0.2}


def _adamerging_entries(entry: dict, where: str) -> list[dict]:
    """``{method: adamerging, granularity: task|layer (or a list), plus: bool (or a list), steps, lr, init,
    batch_size, ties_density}``: one learned candidate per granularity x plus."""
    keys = {k: v for k, v in entry.items() if k != "method"}
    for k in keys:
        if k not in ADAMERGING_LEARN:
            raise ConfigError(f"{where}: adamerging learned by tune takes {sorted(ADAMERGING_LEARN)}, not {k!r}"
                              f"{suggest(k, ADAMERGING_LEARN)} (or coefficients: FILE to merge with saved ones)")
    s = {**ADAMERGING_LEARN, **keys}
    grans = s["granularity"] if isinstance(s["granularity"], list) else [s["granularity"]]
    pluses = s["plus"] if isinstance(s["plus"], list) else [s["plus"]]
    for g in grans:
        if g not in ("task", "layer"):
            raise ConfigError(f"{where}: granularity {g!r}: use task or layer (or a list of them)")
    if not all(isinstance(p, bool) for p in pluses):
        raise ConfigError(f"{where}: plus: true or false (AdaMerging++: TIES-processed task vectors), or a list")
    for k, low, high, kind in (("steps", 1, None, int), ("batch_size", 1, None, int), ("lr", 0, 10, float),
                               ("init", 0, 1, float), ("ties_density", 0, 1, float)):
        v = s[k]
        if isinstance(v, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
            raise ConfigError(f"{where}: {k}: expected {'an integer' if kind is int else 'a number'}, got {v!r}")
        if v < low or (high is not None and v > high) or (k in ("lr", "ties_density") and v <= 0):
            raise ConfigError(f"{where}: {k} = {v} is out of range")
        s[k] = kind(v)
    out = []
    for g in grans:
        for p in pluses:
            learn = {"granularity": g, "plus": p, "steps": s["steps"], "lr": s["lr"], "init": s["init"],
                     "batch_size": s["batch_size"]}
            if p:
                learn["ties_density"] = s["ties_density"]
            out.append(learn)
    return out


def _lines_entry(spec: Any, m, params: dict, where: str) -> dict:
    """A search entry's ``lines:`` — ``{beta: number | list | range | auto, alpha: auto | number}`` (``lines: auto``
    = beta searched, alpha auto).  With LiNeS the searched scale is beta; the method's own scale is fixed."""
    from submerge.methods.lines import Lines

    if spec == "auto":
        spec = {"beta": "auto"}
    if not isinstance(spec, dict) or "beta" not in spec or set(spec) - {"beta", "alpha"}:
        raise ConfigError(f"{where}: lines: give {{beta: number | list | range | auto, alpha: auto | number}}")
    if not m.needs_base:
        raise ConfigError(f"{where}: lines: LiNeS rescales a task-vector method's update; {m.name} makes none")
    if m.scale_param is not None and isinstance(_values(m.scale_param, params.get(m.scale_param, 1.0), where),
                                                (str, list)):
        raise ConfigError(f"{where}: with lines: the searched scale is lines.beta; give {m.scale_param} one value "
                          f"(with alpha auto it does not change the merge)")
    if m.scale_param is not None:
        params.setdefault(m.scale_param, 1.0)
    beta = _values("lines.beta", spec["beta"], where)
    if isinstance(beta, str) and beta != "auto":
        raise ConfigError(f"{where}: lines.beta: {beta!r} — give a number, a list, a range or auto")
    out = {"beta": beta}
    if "alpha" in spec and spec["alpha"] not in (None, "auto"):
        out["alpha"] = spec["alpha"]
    Lines.of({"beta": 0.5, **{k: v for k, v in out.items() if k == "alpha"}})  # the alpha is checked here
    return out


def _objective(obj: Any, names: list[str]) -> dict:
    if obj is None or obj == "mean":
        return {"kind": "mean"}
    if obj in ("worst", "min"):
        return {"kind": "worst"}
    if isinstance(obj, dict) and set(obj) == {"weighted"} and isinstance(obj["weighted"], dict):
        w = obj["weighted"]
        bad = [k for k in w if k not in names]
        if bad:
            raise ConfigError(f"objective: weighted: unknown task(s) {bad}{suggest(str(bad[0]), names)}; "
                              f"tasks: {names}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in w.values()) \
                or not sum(w.values()) > 0:
            raise ConfigError("objective: weighted: weights must be non-negative numbers, not all zero")
        return {"kind": "weighted", "weights": {k: float(w.get(k, 0.0)) for k in names}}
    raise ConfigError(f"objective: {obj!r}; use mean, worst or {{weighted: {{task: weight}}}}")


def _stats_spec(block: Any, defaults: dict, where: str, config_dir: Path) -> dict:
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: expected a mapping of {sorted(defaults)}")
    known_keys(block, defaults, where)
    spec = {**defaults, **block}
    if spec.get("inputs") is not None:
        p = Path(str(spec["inputs"])).expanduser()
        spec["inputs"] = p if p.is_absolute() else config_dir / p
    return spec


def parse_tune(raw: Any, config_dir: Path, source: str = "tune config") -> TuneSpec:
    from submerge.evaluate.registry import make_scorer

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping")
    refuse_nul(raw, source)
    if "merge_method" in raw:
        raise ConfigError(f"{source}: a tune config has no merge_method; list the methods to try under 'search:'")
    for k in ("search", "eval"):
        if k not in raw:
            raise ConfigError(f"{source}: missing '{k}:' (see `submerge tune --help`)")
    merge = {k: v for k, v in raw.items() if k not in TUNE_KEYS}
    models_raw = merge.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise ConfigError(f"{source}: 'models:' must list the experts (one per task)")
    if "slices" in merge:
        raise ConfigError(f"{source}: tune merges whole models ('models:'), not slices")
    cal_defaults = _stats_spec(raw.get("calibrate") or {}, CALIBRATE_KEYS, "calibrate", config_dir)
    fis_defaults = _stats_spec(raw.get("fisher") or {}, FISHER_KEYS, "fisher", config_dir)
    entries, clean = [], []
    for i, mdl in enumerate(models_raw):
        if not isinstance(mdl, dict) or "model" not in mdl:
            raise ConfigError(f"models[{i}]: expected a mapping with 'model:'")
        ref = str(mdl["model"])
        name = str(mdl.get("name") or Path(ref.split("+")[0].split("@")[0]).name)
        stats: dict[str, StatsJob] = {}
        if mdl.get("calibration"):
            folder = Path(resolve_ref(str(mdl["calibration"]), config_dir))
            from submerge.stats.fisher import is_fisher_folder

            kind = "fisher" if is_fisher_folder(folder) else "calibration"
            stats[kind] = StatsJob(kind, folder=folder)
        if "calibrate" in mdl:
            stats["calibration"] = StatsJob("calibration", spec=_stats_spec(
                {**{k: v for k, v in cal_defaults.items() if k != "inputs" or v is not None}, **(mdl["calibrate"] or {})},
                CALIBRATE_KEYS, f"models[{i}].calibrate", config_dir))
        if "fisher" in mdl:
            f = mdl["fisher"]
            if isinstance(f, str):
                stats["fisher"] = StatsJob("fisher", folder=Path(resolve_ref(f, config_dir)))
            else:
                stats["fisher"] = StatsJob("fisher", spec=_stats_spec(
                    {**{k: v for k, v in fis_defaults.items() if k != "inputs" or v is not None}, **(f or {})},
                    FISHER_KEYS, f"models[{i}].fisher", config_dir))
        params = mdl.get("parameters") or {}
        if not all(isinstance(v, (int, float, str, bool)) for v in params.values()):
            raise ConfigError(f"models[{i}].parameters: tune takes scalar per-model parameters only "
                              f"(no gradients or filters)")
        entries.append(ModelEntry(name, ref, dict(params)))
        entries[-1].stats = stats
        c = {k: v for k, v in mdl.items() if k not in MODEL_KEYS}
        c["model"] = resolve_ref(ref, config_dir) if "+" not in ref else "+".join(resolve_ref(r, config_dir) for r in ref.split("+"))
        if c.get("calibration"):
            c["calibration"] = resolve_ref(str(c["calibration"]), config_dir)
        clean.append(c)
    names = [e.name for e in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"models: task name(s) {dup} used twice; give each model a distinct 'name:'")
    merge["models"] = clean
    if merge.get("base_model"):
        b = str(merge["base_model"])
        merge["base_model"] = resolve_ref(b, config_dir)
    # the merge part alone must be a valid config (any method): keys, dtypes, tokenizer block
    parse_config({**merge, "merge_method": "linear"}, source)
    candidates = _candidates(raw["search"], [e.parameters for e in entries])
    tasks = eval_tasks(raw["eval"], entries, config_dir)
    for t in tasks:
        make_scorer(t).check()  # data files and fields, scorer imports: before any model is loaded
    if any(c.learn is not None for c in candidates):
        other = [t.name for t in tasks if t.scorer != "classification"]
        if other:
            raise ConfigError(f"search: adamerging learns from the entropy of each task's class predictions; "
                              f"task(s) {other} are not scored by classification (give coefficients: FILE instead)")
    return TuneSpec(merge, entries, candidates, tasks, _objective(raw.get("objective"), names), config_dir, raw)


def load_tune(path: Union[str, Path]) -> TuneSpec:
    from submerge.engine.config import MAX_CONFIG_BYTES
    from submerge.io.files import read_config_text

    p = Path(path)
    raw = load_yaml_text(read_config_text(p, "tune config", MAX_CONFIG_BYTES), str(p))
    return parse_tune(raw, p.resolve().parent, str(p))
