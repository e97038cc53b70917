"""`submerge pareto`: preview the multitask trade-off front by posterior merging, against the real thing.

For task weights α on the simplex (a grid for 2 or 3 tasks, Dirichlet samples for more) each
merging rule gives one model, scored on every task with the benchmark's evaluator; the experts stay
in memory, so a point costs one merge + one evaluation.  Rules (``posterior`` method families):

* ``isotropic`` — equal isotropic Gaussians = task arithmetic with weights α;
* ``diagonal``  — diagonal Gaussians with the experts' Fisher (prior precision from the base);
* ``mixture``   — each task a mixture of its fine-tunes from ``mixture_seeds`` (K components), EM.

For 2 tasks, ``multitask`` weightings also train true multitask fine-tunes (loss Σ α_t ℓ_t, the
experts' recipe, each step one batch of every task): the expensive ground truth on the same plot.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from submerge.api import merge_state_dicts
from submerge.bench.session import BenchConfig, BenchSession
from submerge.errors import ConfigError
from submerge.io import check_output_target
from submerge.io.ledger import one_run

RULES = ("isotropic", "diagonal", "mixture")


@dataclass
class ParetoConfig:
    tasks: list[str]
    grid: int = 21                       # points per edge of the simplex (2 tasks: 21 = steps of 0.05)
    samples: int = 30                    # more than 3 tasks: Dirichlet samples
    rules: list[str] = field(default_factory=lambda: list(RULES))
    mixture_seeds: list[int] = field(default_factory=lambda: [0, 1])
    multitask: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    split: str = "test"
    seed: int = 0
    prior_precision: float = 1e-3
    em_steps: int = 3
    bench: BenchConfig = field(default_factory=BenchConfig)


def simplex_grid(n_tasks: int, grid: int, samples: int = 30, seed: int = 0) -> list[tuple[float, ...]]:
    """Weight vectors on the simplex: the lattice with ``grid`` points per edge for 2-3 tasks, else
    the corners, the centre and Dirichlet(1) samples."""
    if n_tasks < 2:
        raise ConfigError("a Pareto front needs at least 2 tasks")
    if grid < 2:
        raise ConfigError(f"grid must be >= 2, got {grid}")
    if n_tasks <= 3:
        m = grid - 1
        pts = [c for c in itertools.product(range(m + 1), repeat=n_tasks - 1) if sum(c) <= m]
        return [tuple(round(x / m, 10) for x in (*c, m - sum(c))) for c in pts]
    rng = np.random.default_rng(seed)
    corners = [tuple(float(i == j) for j in range(n_tasks)) for i in range(n_tasks)]
    centre = [tuple([1.0 / n_tasks] * n_tasks)]
    return corners + centre + [tuple(map(float, v)) for v in rng.dirichlet(np.ones(n_tasks), samples)]


def _scores(S: BenchSession, state: dict, split: str) -> dict[str, float]:
    return {k: float(v.mean()) for k, v in S.evaluate(state, split).items()}


def _extra_seed_experts(S: BenchSession, seed: int) -> list[dict]:
    return [S.train_expert(t, seed)[0] for t in S.tasks]


@one_run
def run_pareto(out_dir: str | Path, cfg: ParetoConfig, overwrite: bool = False) -> dict:
    """Sweep the weights, merge with each rule, score; multitask ground truth; JSON + Markdown + PNG (an earlier
    run's results in ``out_dir`` are replaced only with ``overwrite``)."""
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    check_output_target(out_dir, what="results folder")
    if (out_dir / "pareto.json").exists() and not overwrite:
        raise ConfigError(f"results folder {out_dir} already holds a pareto.json (pass --overwrite to replace it, "
                          f"or --out for another folder)")
    bad = set(cfg.rules) - set(RULES)
    if bad:
        raise ConfigError(f"unknown rule(s) {sorted(bad)}; use {list(RULES)}")
    bench = BenchConfig(**{**asdict(cfg.bench), "recipe": cfg.bench.recipe, "tasks": list(cfg.tasks), "seed": cfg.seed})
    S = BenchSession(bench)
    T = len(S.tasks)
    points = simplex_grid(T, cfg.grid, cfg.samples, cfg.seed)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    fisher = S.fisher() if {"diagonal", "mixture"} & set(cfg.rules) else None
    timing["fisher_seconds"] = time.perf_counter() - t0
    components, comp_fisher, comp_task = None, None, None
    if "mixture" in cfg.rules:
        t0 = time.perf_counter()
        components, comp_fisher, comp_task = list(S.experts), list(fisher), [t.name for t in S.tasks]
        for sd in [s for s in cfg.mixture_seeds if s != cfg.seed]:
            extra = _extra_seed_experts(S, sd)
            comp_fisher += S.fisher(experts=extra)
            components += extra
            comp_task += [t.name for t in S.tasks]
        timing["mixture_components_seconds"] = time.perf_counter() - t0
    fronts: dict[str, list[dict]] = {r: [] for r in cfg.rules}
    sweep_t0 = time.perf_counter()
    for rule in cfg.rules:
        merge_s = eval_s = 0.0
        for w in points:
            m0 = time.perf_counter()
            if rule == "mixture":
                models, stats = components, comp_fisher
                mp = [{"weight": w[S.names.index(tn)], "task": tn} for tn in comp_task]
                params = {"family": "mixture", "prior_precision": cfg.prior_precision, "em_steps": cfg.em_steps}
            else:
                models, stats = S.experts, (fisher if rule == "diagonal" else None)
                mp = [{"weight": x} for x in w]
                params = {"family": rule, "prior_precision": cfg.prior_precision if rule == "diagonal" else 1.0}
            state = merge_state_dicts("posterior", S.base, models, params, mp, stats=stats)
            e0 = time.perf_counter()
            fronts[rule].append({"weights": list(w), "acc": _scores(S, state, cfg.split)})
            merge_s += e0 - m0
            eval_s += time.perf_counter() - e0
        timing[f"{rule}_merge_seconds"] = merge_s
        timing[f"{rule}_eval_seconds"] = eval_s
    timing["sweep_seconds"] = time.perf_counter() - sweep_t0
    truth = []
    if T == 2 and cfg.multitask:
        for a in cfg.multitask:
            state, info = S.train_multitask((a, 1 - a), cfg.seed)
            truth.append({"weights": [a, 1 - a], "acc": _scores(S, state, cfg.split), "seconds": info["seconds"],
                          "cached": info.get("cached", False)})
    experts = [{"task": t.name, "acc": _scores(S, sd, cfg.split)} for t, sd in zip(S.tasks, S.experts)]
    zero = {"acc": {t.name: float(S.zs_test[t.name].mean() if cfg.split == "test" else S.zs_val[t.name].mean())
                    for t in S.tasks}}
    ft_seconds = [S.ft_logs[t.name].get("seconds") for t in S.tasks]
    results = {"tasks": S.names, "split": cfg.split, "seed": cfg.seed, "points": len(points), "rules": cfg.rules,
               "fronts": fronts, "multitask": truth, "experts": experts, "zero_shot": zero,
               "gaps": gaps_to_truth(fronts, truth, S.names), "timing": timing,
               "finetune_seconds": ft_seconds, "config": {**asdict(cfg), "bench": None},
               "seconds_total": time.perf_counter() - t_start}
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a refused or failed run leaves no empty OUT
    (out_dir / "pareto.json").write_text(json.dumps(results, indent=2))
    plot_fronts(results, out_dir / "pareto.png")
    (out_dir / "pareto.md").write_text(markdown(results))
    return results


def gaps_to_truth(fronts: dict, truth: list[dict], names: list[str]) -> dict:
    """Per rule: mean distance (accuracy points) from each multitask model to the rule's model at the same
    weights, and to the nearest point of the rule's front (polyline, 2 tasks)."""
    out = {}
    if not truth:
        return out
    for rule, pts in fronts.items():
        same, near = [], []
        curve = np.array([[p["acc"][n] for n in names] for p in sorted(pts, key=lambda p: p["weights"][0])]) * 100
        for g in truth:
            gt = np.array([g["acc"][n] for n in names]) * 100
            match = min(pts, key=lambda p: sum(abs(a - b) for a, b in zip(p["weights"], g["weights"])))
            same.append(float(np.linalg.norm(np.array([match["acc"][n] for n in names]) * 100 - gt)))
            near.append(_dist_to_polyline(gt, curve))
        out[rule] = {"same_weights": float(np.mean(same)), "to_front": float(np.mean(near)),
                     "per_weighting_same": same, "per_weighting_front": near}
    return out


def _dist_to_polyline(p: np.ndarray, curve: np.ndarray) -> float:
    if len(curve) == 1:
        return float(np.linalg.norm(p - curve[0]))
    best = math.inf
    for a, b in zip(curve[:-1], curve[1:]):
        ab = b - a
        t = float(np.clip(np.dot(p - a, ab) / max(np.dot(ab, ab), 1e-12), 0, 1))
        best = min(best, float(np.linalg.norm(p - (a + t * ab))))
    return best


def plot_fronts(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = results["tasks"]
    pairs = list(itertools.combinations(range(len(names)), 2))[:3]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.6), squeeze=False)
    colours = {"isotropic": "tab:blue", "diagonal": "tab:orange", "mixture": "tab:green"}
    for ax, (i, j) in zip(axes[0], pairs):
        a, b = names[i], names[j]
        for rule, pts in results["fronts"].items():
            pts = sorted(pts, key=lambda p: p["weights"][i] - p["weights"][j])
            xs, ys = [100 * p["acc"][a] for p in pts], [100 * p["acc"][b] for p in pts]
            ax.plot(xs, ys, "-o", ms=3, lw=1.2, color=colours.get(rule), label=f"posterior: {rule}")
        if results["multitask"]:
            xs = [100 * g["acc"][a] for g in results["multitask"]]
            ys = [100 * g["acc"][b] for g in results["multitask"]]
            ax.plot(xs, ys, "k*--", ms=10, lw=1, label="multitask fine-tuning (ground truth)")
            for g, x, y in zip(results["multitask"], xs, ys):
                ax.annotate(f"α={g['weights'][0]:.1f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for e in results["experts"]:
            ax.plot(100 * e["acc"][a], 100 * e["acc"][b], "rs", ms=7)
            ax.annotate(f"expert {e['task']}", (100 * e["acc"][a], 100 * e["acc"][b]), fontsize=7,
                        textcoords="offset points", xytext=(4, -10))
        z = results["zero_shot"]["acc"]
        ax.plot(100 * z[a], 100 * z[b], "x", color="grey", ms=8, label="zero-shot")
        ax.set_xlabel(f"{a} accuracy (%)")
        ax.set_ylabel(f"{b} accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Pareto fronts by posterior merging ({results['split']} split, {results['points']} weightings)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def markdown(results: dict) -> str:
    names = results["tasks"]
    lines = [f"# Pareto fronts: {', '.join(names)} ({results['split']} split, seed {results['seed']})", "",
             f"{results['points']} weightings per rule; accuracy in %. Total run {results['seconds_total'] / 60:.1f} min.",
             "", "| rule | weights | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for rule, pts in results["fronts"].items():
        for p in pts:
            lines.append(f"| {rule} | {', '.join(f'{w:.2f}' for w in p['weights'])} | "
                         + " | ".join(f"{100 * p['acc'][n]:.1f}" for n in names) + " |")
    for g in results["multitask"]:
        lines.append(f"| multitask fine-tune | {', '.join(f'{w:.2f}' for w in g['weights'])} | "
                     + " | ".join(f"{100 * g['acc'][n]:.1f}" for n in names) + " |")
    for e in results["experts"]:
        lines.append(f"| expert {e['task']} | – | " + " | ".join(f"{100 * e['acc'][n]:.1f}" for n in names) + " |")
    if results["gaps"]:
        lines += ["", "Distance to the multitask ground truth (accuracy points, mean over the weightings):", "",
                  "| rule | same weights | nearest point of the front |", "|---|---:|---:|"]
        for rule, g in results["gaps"].items():
            lines.append(f"| {rule} | {g['same_weights']:.2f} | {g['to_front']:.2f} |")
    t = results["timing"]
    ft = [s for s in results["finetune_seconds"] if s]
    mt = [g["seconds"] for g in results["multitask"] if not g.get("cached")]
    lines += ["", "Timing (seconds): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items())
              + (f"; one expert fine-tune {np.mean(ft):.1f}" if ft else "")
              + (f"; one multitask fine-tune {np.mean(mt):.1f}" if mt else "")]
    return "\n".join(lines) + "\n"
