"""Does `strategy: cma` (CMA-ES over mergekit-evolve's genome) beat the grid's best, on the text8 experts? (issue 33)
A benchmark, not a test.

1. ``submerge bench-export`` of the text8 suite (seed 0; cached experts): the base, 8 experts and their
   validation data (300 questions per task; no test example is written).
2. ``submerge tune`` twice on that validation data, the same scorer and objective (mean normalised accuracy):
   - **grid**: TIES with its scale searched by the benchmark's own search (``lambda: auto``), the other
     parameters at their defaults: the val-tuned TIES row of the text8 table;
   - **cma**: TIES over mergekit-evolve's genome, every expert's weight and density as a gradient over the
     layers (2 points each: 32 numbers), λ 1, ``evaluations`` points (default 48), seed 0.
3. Test, once per winner, after both searches have finished: the two written models scored on the text8 test
   split by the benchmark's own code, with the paired 95% bootstrap interval of (cma − grid).

    python benchmarks/cma_vs_grid.py [--evaluations 48] [--threads 1] [--work /tmp/submerge-cma]

Writes benchmarks/results/tune/cma_vs_grid.json and .md (every evaluated point is in the tune folders' tune.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

HERE = Path(__file__).resolve().parent


def configs(export: Path, evaluations: int) -> dict[str, dict]:
    base = yaml.safe_load((export / "tune.yaml").read_text())
    grid = dict(base, search=[s for s in base["search"] if s["method"] == "ties"])
    cma = dict(base, search=[{"method": "ties", "strategy": "cma", "genome": {"weight": [0.0, 1.0],
                                                                             "density": [0.1, 1.0]},
                              "layer_points": 2, "evaluations": evaluations, "lambda": 1.0}])
    return {"grid": grid, "cma": cma}


def main() -> None:
    from safetensors.torch import load_file

    from submerge.bench.evaluate import paired_diff_ci
    from submerge.bench.export import export_bench
    from submerge.bench.session import BenchConfig, BenchSession
    from submerge.tune import tune

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--evaluations", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/submerge-cma"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "tune")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = BenchConfig(quiet=True)  # text8, seed 0: the canonical table's experts (cached)
    export = args.work / "export"
    if not (export / "tune.yaml").is_file():
        export_bench(export, cfg)
    runs = {}
    for name, config in configs(export, args.evaluations).items():
        folder = args.work / f"tuned-{name}"
        t0 = time.perf_counter()
        res = tune(config, folder, overwrite=True, quiet=True, threads=args.threads, config_dir=export)
        seconds = time.perf_counter() - t0
        (cand,) = res.results
        runs[name] = {"seconds": seconds, "evaluations": len(cand.points), "winner": res.winner,
                      "val_objective": cand.best.objective if cand.best else None, "folder": str(folder)}
        print(f"{name}: val objective {runs[name]['val_objective']:.4f} after {len(cand.points)} points, "
              f"{seconds:.0f} s", flush=True)
    # test, once per winner, only now
    S = BenchSession(cfg)
    names = S.names
    ft_mean = [max(S.ft_test[t].mean(), 1e-9) for t in names]
    test = {}
    for name, run in runs.items():
        state = {}
        for f in sorted(Path(run["folder"]).glob("*.safetensors")):
            state.update(load_file(f))
        test[name] = S.evaluate(state, "test")
        per = {t: float(test[name][t].mean()) for t in names}
        run["test"] = {"per_task": per, "avg_abs": float(np.mean(list(per.values()))),
                       "avg_norm": float(np.mean([per[t] / m for t, m in zip(names, ft_mean)]))}
    diff, lo, hi = paired_diff_ci([test["cma"][t] for t in names], [test["grid"][t] for t in names], ft_mean)
    out = {"suite": "text8", "seed": 0, "tasks": names, "threads": torch.get_num_threads(), "runs": runs,
           "cma_minus_grid_test_norm": {"diff": diff, "ci95": [lo, hi]}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cma_vs_grid.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    (args.out / "cma_vs_grid.md").write_text(markdown(out))
    print((args.out / "cma_vs_grid.md").read_text())


def markdown(out: dict) -> str:
    r = out["runs"]
    d = out["cma_minus_grid_test_norm"]
    lines = ["# `strategy: cma` against the grid on the text8 experts (TIES, seed 0)", "",
             f"`benchmarks/cma_vs_grid.py`, {out['threads']} thread(s). Both searches saw validation only (300 "
             "questions per task, mean normalised accuracy); test was scored once per winner, afterwards.", "",
             "| search | evaluated points | wall | val objective | test avg acc | test norm |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in ("grid", "cma"):
        x = r[name]
        lines.append(f"| {name} | {x['evaluations']} | {x['seconds'] / 60:.1f} min | {x['val_objective']:.4f} "
                     f"| {100 * x['test']['avg_abs']:.2f} | {100 * x['test']['avg_norm']:.2f} |")
    lines += ["", f"Test, cma − grid (normalised, paired bootstrap over test examples): {100 * d['diff']:+.2f} points "
              f"[{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}].", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
