"""Does `submerge tune` reproduce the benchmark's val-tuned rows?

1. `bench-export` the suite (base, experts, validation data, tune.yaml with TA, TIES, TSV-M, Iso-CTS, ESM, auto);
2. `submerge tune` on it (validation only) -> each method's chosen scale, and the winner written as a folder;
3. `run_bench` on the same experts with the same methods and the full scale search -> its val-tuned rows;
4. the written model scored by the benchmark on test, against the bench row of the same method.

Usage: python benchmarks/tune_reproduce.py [--suite quick|text8] [--seed 0] [--backend local|ray]
                                          [--out benchmarks/results/tune]
Writes reproduce-<suite>-seed<seed>[-ray].json and .md (tune's wall time and the script's peak RSS included).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from submerge.bench.export import TUNE_METHODS, export_bench
from submerge.bench.run import run_bench
from submerge.bench.session import BenchConfig, BenchSession
from submerge.search import LAMBDA_GRID
from submerge.tune import tune


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="quick", choices=["quick", "text8"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="local", choices=["local", "ray"])
    ap.add_argument("--out", default="benchmarks/results/tune")
    a = ap.parse_args()
    # the full search everywhere, on the papers' λ grid (the quick run's own grid is coarser): what `auto` does;
    # every other setting as the suite's own run (so the bench side reuses that run's cached rows)
    kw = dict(seed=a.seed, quiet=True, methods=list(TUNE_METHODS), search="full", lambda_grid=list(LAMBDA_GRID))
    cfg = BenchConfig.quick(**kw) if a.suite == "quick" else BenchConfig(suite=a.suite, **kw)
    work = Path(tempfile.mkdtemp(prefix="tune-reproduce-"))
    t0 = time.perf_counter()
    export_bench(work / "export", cfg)
    t_export = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = tune(work / "export" / "tune.yaml", work / "tuned", quiet=True, cache_dir=work / "stats", backend=a.backend)
    t_tune = time.perf_counter() - t0
    rss_tune = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB, the driver (Ray actors not counted)
    t0 = time.perf_counter()
    bench = run_bench(work / "bench", cfg)
    t_bench = time.perf_counter() - t0
    rows = {r["method"]: r for r in bench["rows"] if r["setting"] == "val-tuned"}
    methods = []
    for c in res.report["candidates"]:
        b = rows[c["method"]]
        methods.append({"method": c["method"], "tune_scale": c["best"]["scale"], "bench_scale": b["alpha"],
                        "tune_val_objective": c["best"]["objective"],
                        "bench_val_objective": b["val_curve"][str(b["alpha"])] if "val_curve" in b else None,
                        "same_scale": abs(c["best"]["scale"] - b["alpha"]) < 1e-6})
    # the written winner, scored by the benchmark on test, against the bench's row of that method
    from safetensors.torch import load_file

    S = BenchSession(cfg)
    written = load_file(str(work / "tuned" / "model.safetensors"))
    state = {k: written[k] for k in S.base}
    test = S.evaluate(state, "test")
    w = res.winner["method"]
    per_task = {k: float(v.mean()) for k, v in test.items()}
    bench_row = rows[w]["per_task"]
    out = {"suite": a.suite, "seed": a.seed, "methods": methods, "winner": res.winner["label"],
           "winner_method": w, "written_model_test": per_task, "bench_row_test": bench_row,
           "same_test_accuracy": all(abs(per_task[k] - bench_row[k]) < 1e-9 for k in per_task),
           "max_test_diff": max(abs(per_task[k] - bench_row[k]) for k in per_task),
           "seconds": {"export": t_export, "tune": t_tune, "bench": t_bench}, "backend": a.backend,
           "peak_rss_mb_through_tune": rss_tune,
           "evaluations": sum(len(c["points"]) for c in res.report["candidates"])}
    od = Path(a.out)
    od.mkdir(parents=True, exist_ok=True)
    stem = f"reproduce-{a.suite}-seed{a.seed}" + ("-ray" if a.backend == "ray" else "")
    (od / f"{stem}.json").write_text(json.dumps(out, indent=2))
    lines = [f"# tune vs bench, {a.suite} suite, seed {a.seed}, tune backend {a.backend}", "",
             "| method | tune scale | bench scale | same | tune val objective | bench val objective |",
             "|---|---:|---:|---|---:|---:|"]
    for m in methods:
        bv = m["bench_val_objective"]
        lines.append(f"| {m['method']} | {m['tune_scale']:.6g} | {m['bench_scale']:.6g} | {m['same_scale']} | "
                     f"{m['tune_val_objective']:.4f} | {'-' if bv is None else format(bv, '.4f')} |")
    lines += ["", f"Winner written by tune: {res.winner['label']} ({w}).", "",
              "| task | written model, test (bench scorer) | bench row, test |", "|---|---:|---:|"]
    for k in per_task:
        lines.append(f"| {k} | {per_task[k]:.4f} | {bench_row[k]:.4f} |")
    lines += ["", f"Same test accuracy: {out['same_test_accuracy']} (max difference {out['max_test_diff']:.2g}). "
              f"Seconds: export {t_export:.0f}, tune {t_tune:.0f} ({out['evaluations']} validation points), "
              f"bench {t_bench:.0f} (rows cached by an earlier run of the suite are reused). Peak RSS of this "
              f"script through tune: {rss_tune:.0f} MB (the driver only; Ray actors are separate processes).", ""]
    (od / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
