"""ESM on the text suite: the authors' recipes, one-factor-at-a-time ablations, and the baselines.

    python benchmarks/esm_ablation.py run --seed 0 --out benchmarks/results/esm_ablation/text8/seed0
    python benchmarks/esm_ablation.py table benchmarks/results/esm_ablation/text8 --out .../README.md

``run`` scores each variant as the benchmark does: the scale chosen on the validation split
only (search_alpha: golden section on the recipe's bounds for ESM, the papers' grids for the
others, extended at an edge), then the test split touched once.  Per-example test correctness
is saved so ``table`` can compute paired bootstrap intervals, per seed and pooled over seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from submerge.bench.evaluate import paired_diff_ci
from submerge.bench.session import BenchConfig, BenchSession
from submerge.search import search_alpha

VIT = {"recipe": "vit"}
# name -> (method, parameters, calibration overrides, what changes)
VARIANTS: dict[str, tuple[str, dict, dict, str]] = {
    "task_arithmetic": ("task_arithmetic", {"weight": 1.0}, {}, "baseline"),
    "tsv": ("tsv", {}, {}, "baseline (TSV-M)"),
    "iso_c": ("iso_c", {}, {}, "baseline"),
    "iso_cts": ("iso_cts", {}, {}, "baseline"),
    "regmean": ("regmean", {}, {}, "baseline (data-based, no scale)"),
    "esm": ("esm", {}, {}, "submerge's default (recipe essential_tsv = esd_tsv + layer polarisation)"),
    "esm_vit": ("esm", VIT, {}, "authors' ViT recipe"),
    "esm_glue": ("esm", {"recipe": "glue"}, {}, "authors' GLUE recipe"),
    "vit+alpha_all": ("esm", {**VIT, "alpha_scope": "all"}, {}, "alpha scales every tensor"),
    "vit+fusion_tsv": ("esm", {**VIT, "fusion": "tsv"}, {}, "keep each task's spectrum (TSV-M fusion)"),
    "vit+qkv_separate": ("esm", {**VIT, "stack_qkv": False}, {}, "q, k, v each their own ESD"),
    "vit+esd_all": ("esm", {**VIT, "esd_roles": "all"}, {}, "attention-out also by ESD"),
    "vit+no_polar": ("esm", {**VIT, "task_power": 0.0, "column_power": 0.0, "layer_power": 0.0}, {},
                     "no task/column/layer polarisation"),
    "vit+no_eigw": ("esm", {**VIT, "eig_power": 0.0}, {}, "no eigenvalue re-weighting"),
    "vit+calib128": ("esm", VIT, {"n": 128}, "128 calibration inputs per task"),
    "vit+calib_val": ("esm", VIT, {"split": "val"}, "calibration inputs from the val split"),
    "vit+calib_base": ("esm", VIT, {"source": "base"}, "statistics in the base model"),
    "esm+calib128": ("esm", {}, {"n": 128}, "submerge's default esm with 128 calibration inputs per task"),
    "esm+identity_gram": ("esm", {}, {"identity": True},
                          "control: the default with identity Gram matrices (SVD truncation, no data)"),
    # beyond one factor at a time: the ESD truncation inside TSV-M's fusion (spectrum kept, no scalings)
    "esd_tsv": ("esm", {"recipe": "glue", "fusion": "tsv", "layer_power": 0.0, "eig_power": 0.0, "factor": 1.0,
                        "alpha_scope": "all", "other_fusion": "tsv", "keep_base": "", "embeddings": "mean"}, {},
                "ESD truncation + TSV-M fusion (spectrum kept), no scalings, alpha on all"),
}


def run(args) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from submerge.bench.finetune import Recipe

    recipe = Recipe(lr=args.lr) if args.lr else Recipe()
    tasks = args.tasks.split(",") if args.tasks else None
    cfg = BenchConfig(suite=args.suite, tasks=tasks, seed=args.seed, quiet=True, recipe=recipe)
    if args.suite == "quick":
        cfg = BenchConfig.quick(seed=args.seed, quiet=True, recipe=recipe, tasks=tasks)
    S = BenchSession(cfg)
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    extra = json.loads(args.extra) if args.extra else {}
    for name in names:
        path = out / f"{name}.json"
        if path.exists() and not args.force:
            print(f"{name}: done already", flush=True)
            continue
        if name in VARIANTS:
            method, params, calib, what = VARIANTS[name]
        else:
            method, params, calib, what = extra[name]
        t0 = time.perf_counter()
        if calib.get("identity"):  # control: identity Gram matrices = plain SVD truncation inside ESM
            from submerge.stats.gram import CalibrationStats, LayerStats

            stats = [CalibrationStats({k: LayerStats(torch.eye(v.d_in, dtype=torch.float64), v.mean, v.count, v.layout)
                                       for k, v in st.layers.items()}, st.aliases) for st in S.calibration()]
        else:
            stats = S.calibration(**calib) if method in ("esm", "regmean") else None
        t_cal = time.perf_counter() - t0
        if method == "regmean":
            from submerge.api import merge_state_dicts

            state = merge_state_dicts(method, S.base, S.experts, params, stats=stats)
            alpha, curve, val = None, {}, S.val_score(state)
        else:
            grid = [round(0.1 * i, 2) for i in range(1, 11)] if method == "task_arithmetic" else None
            found = search_alpha(method, S.base, S.experts, S.val_score, params, stats=stats, grid=grid,
                                 patience=None if grid else 3, random_seed=args.seed)
            state, alpha, curve, val = found.state, found.alpha, found.curve, found.score
        t_search = time.perf_counter() - t0 - t_cal
        res = S.evaluate(state, "test")
        rec = {
            "name": name, "method": method, "params": params, "calibration": calib, "what": what,
            "seed": args.seed, "suite": args.suite, "lr": cfg.recipe.lr, "tasks": S.names, "alpha": alpha, "val_norm": val,
            "val_curve": {str(k): v for k, v in curve.items()},
            "test_correct": {k: v.astype(int).tolist() for k, v in res.items()},
            "test_acc": {k: float(v.mean()) for k, v in res.items()},
            "ft_test": {k: float(v.mean()) for k, v in S.ft_test.items()},
            "zs_test": {k: float(v.mean()) for k, v in S.zs_test.items()},
            "test_norm": float(np.mean([res[k].mean() / S.ft_test[k].mean() for k in res])),
            "seconds_calibration": t_cal, "seconds_search": t_search, "val_evals": len(curve),
        }
        path.write_text(json.dumps(rec))
        print(f"{name:18s} alpha={alpha} val={val:.4f} test_norm={rec['test_norm']:.4f} "
              f"({t_search:.0f}s, {len(curve)} evals)", flush=True)


def _load(folder: Path) -> dict[int, dict[str, dict]]:
    seeds: dict[int, dict[str, dict]] = {}
    for f in sorted(folder.glob("**/*.json")):
        rec = json.loads(f.read_text())
        if "test_correct" in rec:
            seeds.setdefault(rec["seed"], {})[rec["name"]] = rec
    return seeds


def _diff(recs_a: list[dict], recs_b: list[dict]) -> tuple[float, float, float]:
    """Paired bootstrap of the normalised difference, pooled over the given seeds (tasks x seeds)."""
    a, b, norm = [], [], []
    for ra, rb in zip(recs_a, recs_b):
        for k in ra["test_correct"]:
            a.append(np.array(ra["test_correct"][k], float))
            b.append(np.array(rb["test_correct"][k], float))
            norm.append(ra["ft_test"][k])
    d, lo, hi = paired_diff_ci(a, b, norm)
    return 100 * d, 100 * lo, 100 * hi


def table(args) -> None:
    seeds = _load(Path(args.folder))
    if not seeds:
        raise SystemExit(f"no results under {args.folder}")
    order = list(seeds)
    names = [n for n in list(VARIANTS) + sorted({n for s in seeds.values() for n in s})
             if all(n in seeds[s] for s in order)]
    names = list(dict.fromkeys(names))
    refs = [r for r in ("tsv", "iso_cts") if r in names]
    lines = [f"Seeds: {', '.join(map(str, order))}. Normalised test accuracy (%), scale chosen on val. "
             f"Differences: paired bootstrap over test examples (B=2000), 95% interval; 'pooled' resamples "
             f"both seeds' examples (mean over tasks x seeds).", "",
             "| variant | what changes | " + " | ".join(f"α s{s}" for s in order) + " | "
             + " | ".join(f"val s{s}" for s in order) + " | " + " | ".join(f"test s{s}" for s in order)
             + " | mean | " + " | ".join(f"− {r} (pooled)" for r in refs) + " |",
             "|" + "---|" * (3 + 3 * len(order) + len(refs))]
    for n in names:
        recs = [seeds[s][n] for s in order]
        alphas = " | ".join("–" if r["alpha"] is None else f"{r['alpha']:.3g}" for r in recs)
        vals = " | ".join(f"{100 * r['val_norm']:.1f}" for r in recs)
        tests = " | ".join(f"{100 * r['test_norm']:.1f}" for r in recs)
        mean = np.mean([100 * r["test_norm"] for r in recs])
        diffs = []
        for ref in refs:
            if n == ref:
                diffs.append("–")
                continue
            d, lo, hi = _diff(recs, [seeds[s][ref] for s in order])
            diffs.append(f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]")
        lines.append(f"| {n} | {recs[0]['what']} | {alphas} | {vals} | {tests} | {mean:.1f} | " + " | ".join(diffs) + " |")
    if len(order) > 1 and refs:
        lines += ["", "Per seed, paired difference vs each baseline (normalised points):", "",
                  "| variant | " + " | ".join(f"− {r} s{s}" for r in refs for s in order) + " |",
                  "|" + "---|" * (1 + len(refs) * len(order))]
        for n in names:
            if n in refs:
                continue
            cells = []
            for ref in refs:
                for s in order:
                    d, lo, hi = _diff([seeds[s][n]], [seeds[s][ref]])
                    cells.append(f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--suite", default="text8")
    r.add_argument("--out", required=True)
    r.add_argument("--variants", default="")
    r.add_argument("--extra", default="", help="JSON {name: [method, params, calibration, what]}")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (a different expert suite)")
    r.add_argument("--tasks", default="", help="comma list of tasks instead of the suite's")
    r.add_argument("--force", action="store_true")
    t = sub.add_parser("table")
    t.add_argument("folder")
    t.add_argument("--out", default="")
    args = ap.parse_args()
    run(args) if args.cmd == "run" else table(args)


if __name__ == "__main__":
    main()
