"""ESM++ on the text suite: residual experts on the val-tuned ESM merge, routed by prototypes.

    python benchmarks/esm_pp.py --seed 0 --out benchmarks/results/esm_pp/text8/seed0
    python benchmarks/esm_pp.py --table benchmarks/results/esm_pp/text8   # table.md over the seeds

The static model is submerge's default ``esm`` at the scale chosen on validation by the ESM
ablation run of the same seed (``benchmarks/results/esm_ablation/text8/seed<N>/esm.json``; the
search is not repeated).  Each variant builds experts from the same calibration statistics
(32 training inputs per task, in the task's expert) and is scored once on test: per-task
accuracy, routing accuracy (per layer and the confusion matrix; the true task of an input is
the task it is scored in), inference time per example against the static model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from submerge.api import merge_state_dicts
from submerge.bench.evaluate import paired_diff_ci
from submerge.bench.session import BenchConfig, BenchSession
from submerge.routing import build_experts

# name -> (rank, routed roles, routing options, mode)
VARIANTS = {
    "r8": (8, "qkv,mlp_in", {}, "route"),
    "r32": (32, "qkv,mlp_in", {}, "route"),
    "r32_all": (32, "all", {}, "route"),
    "r32_global": (32, "qkv,mlp_in", {"global_routing": True}, "route"),
    "r32_oracle": (32, "qkv,mlp_in", {}, "oracle"),
    "r32_proto_merged": (32, "qkv,mlp_in", {"prototypes": "merged"}, "route"),
    "r32_all_oracle": (32, "all", {}, "oracle"),
}


def merged_stats(S: BenchSession, state: dict) -> list:
    """Per task, statistics of the same calibration inputs (32 train texts) run through ``state``."""
    from submerge.stats.gram import collect_stats

    out = []
    S.bb.load(state)
    for t in S.tasks:
        texts, _ = S.sample(t.name, "train", S.cfg.calib_n)
        out.append(collect_stats(S.bb.model, [dict(S.bb.tokenize(texts))], progress=False))
    S.bb.reset()
    return out


def table(folder: Path) -> str:
    """Markdown over the seeds: normalised test accuracy, paired difference vs the static ESM (pooled
    over tasks x seeds), routing accuracy, overhead and inference time."""
    seeds = sorted(int(p.name[4:]) for p in folder.glob("seed*") if (p / "summary.json").exists())
    if not seeds:
        raise SystemExit(f"no results under {folder}")
    summaries = {s: json.loads((folder / f"seed{s}" / "summary.json").read_text()) for s in seeds}
    lines = [f"Seeds {', '.join(map(str, seeds))}. Normalised test accuracy (%) of submerge's default `esm` at its "
             f"val-chosen alpha (static) and of ESM++ on it; difference vs static: paired bootstrap pooled over "
             f"tasks x seeds, 95% interval.", "",
             "| variant | " + " | ".join(f"test s{s}" for s in seeds) + " | mean | − static (pooled) | routing acc. "
             "(layer decisions) | extra params % | ms / example (static) |", "|" + "---|" * (6 + len(seeds))]
    lines.append("| static esm | " + " | ".join(f"{100 * summaries[s]['static_test_norm']:.1f}" for s in seeds)
                 + f" | {np.mean([100 * summaries[s]['static_test_norm'] for s in seeds]):.1f} | – | – | 0 | "
                 + " / ".join(f"{summaries[s]['static_ms_per_example']:.1f}" for s in seeds) + " |")
    names = [n for n in VARIANTS if all((folder / f"seed{s}" / f"{n}.json").exists() for s in seeds)]
    for n in names:
        recs = [json.loads((folder / f"seed{s}" / f"{n}.json").read_text()) for s in seeds]
        a, b, norm = [], [], []
        for s, r in zip(seeds, recs):
            st = json.loads((folder / f"seed{s}" / "static.json").read_text()) if (folder / f"seed{s}" / "static.json").exists() else None
            if st is None:
                break
            for k in r["test_correct"]:
                a.append(np.array(r["test_correct"][k], float))
                b.append(np.array(st["test_correct"][k], float))
                norm.append(r["ft_test"][k])
        diff = "–"
        if len(a) == sum(len(r["test_correct"]) for r in recs):
            d, lo, hi = paired_diff_ci(a, b, norm)
            diff = f"{100 * d:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"
        acc = " / ".join(f"{100 * r['routing']['accuracy']:.1f}" for r in recs) if recs[0]["routing"] else "oracle"
        lines.append(f"| {n} (r={recs[0]['rank']}, {recs[0]['routed']}{''.join(f', {k}={v}' for k, v in recs[0]['options'].items())}"
                     f"{', ' + recs[0]['mode'] if recs[0]['mode'] != 'route' else ''}) | "
                     + " | ".join(f"{100 * r['test_norm']:.1f}" for r in recs)
                     + f" | {np.mean([100 * r['test_norm'] for r in recs]):.1f} | {diff} | {acc} | "
                     f"{recs[0]['overhead']['params_pct_of_base']:.1f} | "
                     + " / ".join(f"{r['ms_per_example']:.1f}" for r in recs) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", default=None, help="write table.md for the seeds under this folder and stop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ablation", default="benchmarks/results/esm_ablation/text8")
    args = ap.parse_args()
    if args.table:
        text = table(Path(args.table))
        (Path(args.table) / "table.md").write_text(text)
        print(text)
        return
    if not args.out:
        ap.error("--out is required")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    esm_rec = json.loads((Path(args.ablation) / f"seed{args.seed}" / "esm.json").read_text())
    S = BenchSession(BenchConfig(seed=args.seed, quiet=True))
    stats = S.calibration()
    alpha = esm_rec["alpha"]
    static = merge_state_dicts("esm", S.base, S.experts, {"alpha": alpha}, stats=stats)
    t0 = time.perf_counter()
    static_res = S.evaluate(static, "test")
    static_s = time.perf_counter() - t0
    n_test = sum(len(v) for v in static_res.values())
    norm = [S.ft_test[k].mean() for k in S.names]
    static_norm = float(np.mean([static_res[k].mean() / S.ft_test[k].mean() for k in S.names]))
    assert abs(static_norm - esm_rec["test_norm"]) < 1e-9, "static ESM differs from the ablation's esm row"
    summary = {"seed": args.seed, "alpha": alpha, "static_test_norm": static_norm,
               "static_ms_per_example": 1000 * static_s / n_test, "variants": {}}
    (out / "static.json").write_text(json.dumps({"alpha": alpha, "test_norm": static_norm,
                                                 "test_correct": {k: v.astype(int).tolist() for k, v in static_res.items()}}))
    print(f"static esm alpha={alpha:.3f} test_norm={static_norm:.4f} ({1000 * static_s / n_test:.2f} ms/ex)", flush=True)
    for name in args.variants.split(","):
        rank, routed, opts, mode = VARIANTS[name]
        t0 = time.perf_counter()
        opts = dict(opts)
        proto = None
        if opts.pop("prototypes", None) == "merged":  # prototypes = mean inputs in the static merge itself
            proto = merged_stats(S, static)
        experts = build_experts(static, S.experts, stats, rank=rank, routed=routed, tasks=S.names,
                                prototype_stats=proto)
        build_s = time.perf_counter() - t0
        res, report, secs = S.evaluate_routed(static, experts, "test", mode, **opts)
        test_norm = float(np.mean([res[k].mean() / S.ft_test[k].mean() for k in S.names]))
        d, lo, hi = paired_diff_ci([res[k] for k in S.names], [static_res[k] for k in S.names], norm)
        rec = {
            "name": name, "rank": rank, "routed": routed, "options": VARIANTS[name][2], "mode": mode, "seed": args.seed,
            "alpha": alpha, "tasks": S.names, "test_norm": test_norm,
            "test_acc": {k: float(v.mean()) for k, v in res.items()},
            "test_correct": {k: v.astype(int).tolist() for k, v in res.items()},
            "ft_test": {k: float(v.mean()) for k, v in S.ft_test.items()},
            "minus_static": [100 * d, 100 * lo, 100 * hi],
            "overhead": experts.overhead(sum(v.numel() for v in S.base.values())),
            "seconds_build": build_s, "ms_per_example": 1000 * secs / n_test,
            "static_ms_per_example": summary["static_ms_per_example"],
            "routing": report.to_dict() if report is not None else None,
            "routing_per_layer_n": report.per_layer_n if report is not None else None,
        }
        (out / f"{name}.json").write_text(json.dumps(rec))
        summary["variants"][name] = {k: rec[k] for k in ("test_norm", "minus_static", "ms_per_example")}
        acc = f" routing acc {report.accuracy:.3f}" if report is not None else ""
        print(f"{name:16s} test_norm={test_norm:.4f} vs static {100 * d:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"
              f"{acc} {rec['ms_per_example']:.2f} ms/ex, +{rec['overhead']['params_pct_of_base']:.1f}% params",
              flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
