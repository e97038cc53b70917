"""Headline table of a suite from several fine-tuning seeds (each a `submerge bench` output folder).

    python benchmarks/combine_seeds.py benchmarks/results/text8/seed0 benchmarks/results/text8/seed1 \
        --out benchmarks/results/text8/README.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    runs = [json.loads((r / "results.json").read_text()) for r in args.runs]
    tasks = runs[0]["tasks"]
    seeds = [r["seed"] for r in runs]
    labels = [row["label"] for row in runs[0]["rows"]]
    by = [{row["label"]: row for row in r["rows"]} for r in runs]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731

    def pct(x: float) -> str:
        return f"{100 * x:.1f}"

    lines = [f"# {runs[0]['suite']}: headline table over fine-tuning seeds {seeds}", "",
             "Mean over seeds of normalised test accuracy (merged / fine-tuned, per task, then averaged); "
             "per-seed values in brackets. Each seed is a full `submerge bench` run (its own experts, its "
             "own validation-chosen λ); test splits and heads are the same across seeds.", "",
             "| method | setting | λ per seed | " + " | ".join(tasks) + " | avg abs | avg norm |",
             "|---|---|---|" + "---:|" * len(tasks) + "---:|---:|"]
    zs_norm = [mean([r["zeroshot"][t] / r["finetuned"][t] for t in tasks]) for r in runs]
    lines.append("| zero-shot | – | – | " + " | ".join(pct(mean([r["zeroshot"][t] / r["finetuned"][t] for r in runs])) for t in tasks)
                 + f" | {pct(mean([mean(list(r['zeroshot'].values())) for r in runs]))} | {pct(mean(zs_norm))} "
                 + "[" + ", ".join(pct(z) for z in zs_norm) + "] |")
    lines.append("| fine-tuned | – | – | " + " | ".join("100.0" for _ in tasks)
                 + f" | {pct(mean([mean(list(r['finetuned'].values())) for r in runs]))} | 100.0 |")
    order = sorted(labels, key=lambda lab: -mean([b[lab]["avg_norm"] for b in by]))
    for lab in order:
        rows = [b[lab] for b in by]
        per = [pct(mean([row["per_task"][t] / r["finetuned"][t] for row, r in zip(rows, runs)])) for t in tasks]
        alphas = "/".join("–" if row["alpha"] is None else f"{row['alpha']:g}" for row in rows)
        lines.append(f"| {rows[0]['method']} | {rows[0]['setting']} | {alphas} | " + " | ".join(per)
                     + f" | {pct(mean([row['avg_abs'] for row in rows]))} | {pct(mean([row['avg_norm'] for row in rows]))} ["
                     + ", ".join(pct(row["avg_norm"]) for row in rows) + "] |")
    lines += ["", "## Paired differences against task arithmetic (val-tuned), per seed (normalised points, 95% CI)", "",
              "| difference | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for key in runs[0]["comparisons"]:
        cells = []
        for r in runs:
            v = r["comparisons"].get(key)
            if v is None:
                cells.append("–")
                continue
            d = v.get("norm_diff", v.get("abs_diff"))
            cells.append(f"{100 * d:+.2f} [{100 * v['ci95'][0]:+.2f}, {100 * v['ci95'][1]:+.2f}]")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "Run time per seed: " + ", ".join(f"seed {r['seed']}: {r['seconds_total'] / 60:.1f} min" for r in runs)
              + " (2 CPU cores, fine-tuning included).", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
