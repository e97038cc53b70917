"""The headline table of a suite over fine-tuning seeds (each seed a `submerge bench` output folder).

    python benchmarks/combine_seeds.py benchmarks/results/text8/seed0 benchmarks/results/text8/seed1 \
        --out benchmarks/results/text8/README.md

Rows are matched by label across seeds.  Every value is the mean over seeds of normalised test accuracy
(merged / that seed's fine-tuned expert, per task, then averaged), with the per-seed values beside it.
Paired differences against TSV-M and task arithmetic (both val-tuned) are computed from the per-example
correctness each results.json keeps: per seed (the runner's own intervals), and pooled over seeds — the mean
over seeds of the per-example differences, one bootstrap over test examples resampling the same examples in
every seed (the test split is the same for all seeds), so the interval is over test examples and the spread
over fine-tuning seeds is the per-seed columns.  Also writes ``normalized_accuracy.png`` (every row, the
mean over seeds as a bar and each seed as a dot) beside ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from submerge.bench.evaluate import unpack_correct
from submerge.bench.report import REFERENCE_NOTES

BASELINES = ("tsv (val-tuned)", "task_arithmetic (val-tuned)")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def per_example(run: dict, label: str) -> dict[str, np.ndarray] | None:
    """Per-task 0/1 correctness of row ``label`` (or the references ``finetuned`` / ``zeroshot``)."""
    pe = run.get("per_example", {})
    got = pe.get(label) if label in ("finetuned", "zeroshot") else pe.get("rows", {}).get(label)
    if got is None:
        return None
    return {t: unpack_correct(got[t], run["task_info"][t]["n_test"]) for t in run["tasks"]}


def pooled_paired(runs: list[dict], a: str, b: str, n_boot: int = 2000, seed: int = 0):
    """Mean over seeds and tasks of (a − b) normalised accuracy, with a 95% bootstrap interval over test
    examples (the same resample in every seed).  None when a seed lacks either row's per-example data."""
    tasks = runs[0]["tasks"]
    diffs = {t: [] for t in tasks}
    for r in runs:
        pa, pb = per_example(r, a), per_example(r, b)
        if pa is None or pb is None:
            return None
        for t in tasks:
            diffs[t].append((pa[t] - pb[t]) / max(r["finetuned"][t], 1e-9))
    rng = np.random.default_rng(seed)
    point, draws = 0.0, np.zeros(n_boot)
    for t in tasks:
        d = np.mean(diffs[t], axis=0)  # per test example, mean over seeds
        point += d.mean()
        draws += d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    k = len(tasks)
    return point / k, float(np.percentile(draws / k, 2.5)), float(np.percentile(draws / k, 97.5))


def _nll(runs: list[dict], key: str) -> str:
    """Mean answer NLL of a reference (``zeroshot_nll`` / ``finetuned_nll``) over tasks and seeds."""
    return f"{np.mean([np.mean(list(r[key].values())) for r in runs]):.3f}"


def _diff_cell(v) -> str:
    return "–" if v is None else f"{100 * v[0]:+.1f} [{100 * v[1]:+.1f}, {100 * v[2]:+.1f}]"


def combine(runs: list[dict]) -> tuple[str, list[dict]]:
    tasks = runs[0]["tasks"]
    seeds = [r["seed"] for r in runs]
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    by = [{row["label"]: row for row in r["rows"]} for r in runs]
    labels = list(dict.fromkeys(lab for b in by for lab in b))
    entries = []
    for lab in labels:
        rows = [b.get(lab) for b in by]
        have = [(row, r) for row, r in zip(rows, runs) if row is not None]
        first = have[0][0]
        entries.append({
            "label": lab, "method": first["method"], "setting": first["setting"],
            "reference": first.get("reference"), "rows": rows,
            "norm": mean([row["avg_norm"] for row, _ in have]),
            "per_seed": [None if row is None else row["avg_norm"] for row in rows],
            "nll": (mean([row["avg_nll"] for row, _ in have])
                    if all(row.get("avg_nll") is not None for row, _ in have) else None),
            "per_task": [mean([row["per_task"][t] / r["finetuned"][t] for row, r in have]) for t in tasks],
            "vs": {ref: (pooled_paired(runs, lab, ref) if len(have) == len(runs) and lab != ref else None)
                   for ref in BASELINES},
        })
    entries.sort(key=lambda e: -e["norm"])

    zs_seed = [mean([r["zeroshot"][t] / r["finetuned"][t] for t in tasks]) for r in runs]
    seed_txt = " / ".join(f"s{s}" for s in seeds)
    llm = runs[0]["suite"] == "llm"
    metric = "exact match of greedy decoding" if llm else "accuracy"
    same = ("questions and demonstrations" if llm else "split and heads")
    out = [
        f"# {runs[0]['suite']}: the canonical table, fine-tuning seed{'s' if len(seeds) > 1 else ''} "
        f"{', '.join(map(str, seeds))}", "",
        f"Backbone `{runs[0]['backbone']['name']}`; {len(tasks)} tasks; each seed is one full `submerge bench "
        f"{'--suite llm ' if llm else ''}--seed S` run (its own experts, every scale chosen on that seed's validation split, test touched once "
        f"per row); the test {same} are the same for all seeds. Values: normalised test {metric} "
        f"(merged / fine-tuned, per task, averaged), mean over seeds, per seed ({seed_txt}) beside it. "
        f"**vs TSV-M** and **vs TA**: paired difference against TSV-M and task arithmetic (both val-tuned), mean "
        f"over seeds with a 95% bootstrap interval over test examples (the same examples resampled in every "
        f"seed). † a reference, not a merge (excluded from \"best\"): "
        + "; ".join(f"{k}: {v}" for k, v in {**REFERENCE_NOTES, "task id": "told the true task id of each input"}.items())
        + ".", "",
        "| method | setting | scale " + seed_txt + " | norm | " + seed_txt + " | vs TSV-M | vs TA |"
        + (" NLL |" if llm else ""),
        "|---|---|---|---:|---|---|---|" + ("---:|" if llm else ""),
        "| fine-tuned experts † | – | – | 100.0 | – | – | – |" + (f" {_nll(runs, 'finetuned_nll')} |" if llm else ""),
        f"| zero-shot † | – | – | {_pct(mean(zs_seed))} | {' / '.join(_pct(z) for z in zs_seed)} | – | – |"
        + (f" {_nll(runs, 'zeroshot_nll')} |" if llm else ""),
    ]
    if llm:
        out.insert(4, "NLL: the gold answers' mean token negative log-likelihood (nats, mean over tasks and seeds; "
                      "the `lm_loss` view; `–` where the row has no single model to score).\n")
    for e in entries:
        ref = bool(e["reference"]) or "task id" in e["setting"] or "oracle" in e["setting"]
        scales = " / ".join("·" if row is None else ("–" if row["alpha"] is None else f"{row['alpha']:.3g}")
                            for row in e["rows"])
        per = " / ".join("·" if v is None else _pct(v) for v in e["per_seed"])
        out.append(f"| {e['method']}{' †' if ref else ''} | {e['setting']} | {scales} | {_pct(e['norm'])} | {per} "
                   f"| {_diff_cell(e['vs'][BASELINES[0]])} | {_diff_cell(e['vs'][BASELINES[1]])} |"
                   + ((" –" if e["nll"] is None else f" {e['nll']:.3f}") + " |" if llm else ""))
    out += ["", "`·`: the row is missing in that seed (then no pooled interval).", "",
            f"## Per task (normalised test {metric}, mean over seeds)", "",
            "| method | setting | " + " | ".join(tasks) + " |", "|---|---|" + "---:|" * len(tasks)]
    for e in entries:
        out.append(f"| {e['method']} | {e['setting']} | " + " | ".join(_pct(v) for v in e["per_task"]) + " |")
    out += ["", f"## Absolute {metric} of the references (test, %, per seed)", "",
            "| task | zero-shot | fine-tuned " + seed_txt + " | majority class |", "|---|---:|---|---:|"]
    for t in tasks:
        out.append(f"| {t} | {_pct(runs[0]['zeroshot'][t])} | "
                   + " / ".join(_pct(r["finetuned"][t]) for r in runs)
                   + f" | {_pct(runs[0]['task_info'][t]['majority_test'])} |")
    routed = [e for e in entries if any(row and row.get("routing") for row in e["rows"])]
    if routed:
        out += ["", "## Routing accuracy (ESM++: share of layer decisions that pick the true task; Surgery: of inputs)", "",
                "| row | " + seed_txt + " |", "|---|---|"]
        for e in routed:
            out.append(f"| {e['label']} | " + " / ".join(
                "·" if not (row and row.get("routing")) else f"{row['routing']['accuracy']:.3f}" for row in e["rows"]) + " |")
    extra = []  # what a row stores beside (or instead of) one merged model, from the first seed
    for e in entries:
        row = next(r for r in e["rows"] if r is not None)
        if row.get("storage"):
            st = row["storage"]
            stored = runs[0].get("experts_bytes")  # the experts as stored (LoRA: the adapters); older runs lack it
            lora = runs[0].get("config", {}).get("recipe", {}).get("kind") == "lora"
            extra.append(f"| {e['label']} | model + one bit per parameter and task: "
                         f"{(st['model_bytes'] + st['masks_bytes']) / 1e6:.0f} MB, against "
                         f"{(stored or st['experts_bytes']) / 1e6:.0f} MB for the {len(tasks)} experts"
                         + ((" (their LoRA adapters)" if stored else " (as dense copies; their adapters are smaller)")
                            if lora else "") + " |")
        elif row.get("surgery_bytes") and "task id" in e["setting"]:
            extra.append(f"| {e['method']} | {len(tasks)} rank-{row['params'].get('surgery_rank', 16)} modules: "
                         f"{row['surgery_bytes'] / 1e6:.2f} MB beside the merge |")
        elif row.get("overhead") and "oracle" not in e["setting"] and "router" not in e["setting"]:
            extra.append(f"| {e['label']} | experts {row['overhead']['expert_bytes'] / 1e6:.1f} MB "
                         f"({row['overhead']['params_pct_of_base']:.1f}% of the base's parameters) |")
    if extra:
        out += ["", "## What the adaptive rows store", "", "| row | storage |", "|---|---|", *extra]
    out += ["", "Wall time of the run that wrote each results.json: " + ", ".join(
        f"seed {r['seed']}: {r['seconds_total'] / 60:.1f} min" + (" (rows kept from an earlier run with --resume)"
                                                                  if r.get("resumed_from") else "") for r in runs)
            + " (2 CPU cores; each row's own `seconds` is in results.json).", ""]
    return "\n".join(out), entries


def plot(entries: list[dict], runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {None: "tab:blue", "oracle": "tab:orange", "multitask": "tab:green"}
    fig, ax = plt.subplots(figsize=(8.5, 0.3 * len(entries) + 1.4))
    y = np.arange(len(entries))[::-1]
    for yi, e in zip(y, entries):
        ax.barh(yi, 100 * e["norm"], color=colours.get(e["reference"], "tab:orange"))
        pts = [100 * v for v in e["per_seed"] if v is not None]
        ax.plot(pts, [yi] * len(pts), "k.", ms=4)
        ax.text(2, yi, f"{100 * e['norm']:.1f}", va="center", fontsize=7, color="white")
    ax.set_yticks(y, [e["label"] + (" †" if e["reference"] else "") for e in entries], fontsize=7)
    ax.axvline(100, color="k", lw=0.8, ls="--")
    zeroshot = 100 * np.mean([np.mean([r["zeroshot"][t] / r["finetuned"][t] for t in r["tasks"]]) for r in runs])
    ax.axvline(zeroshot, color="grey", lw=0.8, ls=":")
    ax.text(zeroshot, len(entries) - 0.4, f" zero-shot {zeroshot:.1f}", fontsize=7, color="grey", va="bottom")
    ax.set_xlim(0, 105)
    ax.set_xlabel(f"normalised test {'exact match' if runs[0]['suite'] == 'llm' else 'accuracy'} "
                  "(% of the fine-tuned experts): bar = mean over seeds, dots = seeds")
    ax.set_title(f"{runs[0]['suite']}: seed{'s' if len(runs) > 1 else ''} {', '.join(str(r['seed']) for r in runs)}"
                 "  († reference, not a merge)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path, help="bench output folders (their results.json), or results files")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--notes", type=Path, default=None, help="a markdown file appended after the tables "
                    "(what the numbers say; written by hand)")
    args = ap.parse_args()
    runs = [json.loads((r if r.is_file() else r / "results.json").read_text()) for r in args.runs]
    text, entries = combine(runs)
    if args.notes:
        text += "\n" + args.notes.read_text()
    args.out.write_text(text)
    plot(entries, runs, args.out.parent / "normalized_accuracy.png")
    print(text)


if __name__ == "__main__":
    main()
