"""Markdown table and PNG plots from a results.json dict.

Rows marked ``reference`` are not merges and never count as the best merged value: ``oracle`` (ESM++ told
the true task id — an upper bound a deployed model does not have) and ``multitask`` (one model fine-tuned
on all tasks jointly — what merging tries to approach without training).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

REFERENCE_NOTES = {
    "oracle": "upper bound: told the true task id of each input, which a deployed merge does not know",
    "multitask": "not a merge: one model fine-tuned on all tasks jointly (the experts' recipe, one batch of "
                 "every task per step)",
}
# Why two rows can make the same predictions (added to the report when they do)
SAME_PREDICTIONS = {
    frozenset({"fisher", "posterior"}): (
        "`posterior` (diagonal family) is Fisher merging with a prior of precision 1e-3 x the tensor's mean Fisher "
        "(Daheim et al.): the two differ only where every expert's Fisher is below about 1e-3 of the mean, too "
        "few entries here to change a prediction"),
    frozenset({"ram", "ramplus_tl"}): (
        "RAM+ rescales only entries that a single expert changed by more than epsilon; fine-tuning moves almost "
        "every entry of every expert, so that branch is (nearly) empty and both reduce to the mean task vector"),
}


def _fmt(x: float) -> str:
    return f"{100 * x:.1f}"


def _scale(x) -> str:
    return "–" if x is None else f"{float(x):.3g}"


def backbone_name(results: dict) -> str:
    b = results["backbone"]
    return b.get("name") or Path(b["path"]).name


def ordered_rows(results: dict) -> list[dict]:
    """Rows by normalised accuracy, best first (the order of the table, the bars and the heat map)."""
    return sorted(results["rows"], key=lambda r: -r["avg_norm"])


def _same_prediction_notes(results: dict) -> list[str]:
    per = results.get("per_example", {}).get("rows", {})
    by_bits: dict[str, list[str]] = {}
    for label, tasks in per.items():
        by_bits.setdefault("|".join(tasks[t] for t in sorted(tasks)), []).append(label)
    notes = []
    for labels in by_bits.values():
        if len(labels) < 2:
            continue
        methods = {next((r["method"] for r in results["rows"] if r["label"] == lab), lab) for lab in labels}
        why = SAME_PREDICTIONS.get(frozenset(methods))
        notes.append(f"{', '.join(f'`{lab}`' for lab in labels)} make identical test predictions"
                     + (f": {why}." if why else "."))
    return notes


def _run_time(results: dict) -> str:
    """This run's wall time and, when rows or experts were kept from earlier runs, what the table cost in all."""
    this = results["seconds_total"] / 60
    kept = sum(1 for r in results["rows"] if r.get("kept"))
    cached = sum(1 for v in results.get("finetune_log", {}).values() if isinstance(v, dict) and v.get("cached"))
    if not kept and not cached or "seconds_compute" not in results:
        return f"Run time {this:.1f} min."
    return (f"Run time {this:.1f} min; {kept} of {len(results['rows'])} rows and {cached} of "
            f"{len(results.get('finetune_log', {}))} fine-tuned models were kept from earlier runs, and the whole "
            f"table took {results['seconds_compute'] / 60:.1f} min of merging, searching and fine-tuning to compute.")


def markdown(results: dict) -> str:
    tasks = results["tasks"]
    zs, ft = results["zeroshot"], results["finetuned"]
    rows = ordered_rows(results)
    merged = [r for r in rows if not r.get("reference")]
    llm = "metric" in results  # the LLM suite: exact match of generated answers
    shots = results.get("config", {}).get("shots", 1) if llm else 0
    protocol = (f"Chat LLM asked each question after {shots} demonstration(s) under its chat template; experts "
                f"fine-tuned per skill "
                f"({results['config']['recipe']['kind']}); score = {results['metric']}"
                if llm else "Frozen zero-shot heads; encoder-only fine-tuning")
    what = "exact match" if llm else "accuracy"
    lines = [
        f"# submerge bench — suite `{results['suite']}`, seed {results['seed']}",
        "",
        f"Backbone: `{backbone_name(results)}` (sha256 {results['backbone']['sha256'][:12]}…, "
        f"{results['backbone']['params'] / 1e6:.1f}M parameters). {protocol}; scales (λ, α) chosen on validation "
        f"(max mean normalised {what}); test touched once per "
        f"row. {what.capitalize()} in %, normalised = merged / fine-tuned per task, averaged, with its 95% bootstrap "
        f"interval over test examples. Rows best first; the best merged value per column in bold (reference rows, "
        f"marked †, excluded). {_run_time(results)}",
        "",
        *(["**Warnings:** " + " ".join(f"{w}." for w in results["warnings"]), ""] if results.get("warnings") else []),
        f"## Absolute test {what}",
        "",
        "| method | setting | scale | " + " | ".join(tasks) + " | avg | norm [95% CI] |",
        "|---|---|---:|" + "---:|" * len(tasks) + "---:|---|",
    ]
    best = {t: max(r["per_task"][t] for r in merged) for t in tasks} if merged else {}
    best_avg = max((r["avg_abs"] for r in merged), default=None)
    best_norm = max((r["avg_norm"] for r in merged), default=None)

    def cell(v: float, b, ref: bool) -> str:
        return f"**{_fmt(v)}**" if not ref and b is not None and abs(v - b) < 1e-12 else _fmt(v)

    def norm_cell(r: dict) -> str:
        c = cell(r["avg_norm"], best_norm, bool(r.get("reference")))
        ci = r.get("avg_norm_ci")
        return f"{c} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else c

    lines.append(f"| {f'base ({shots}-shot)' if llm else 'zero-shot (pre-trained)'} † | – | – | " + " | ".join(_fmt(zs[t]) for t in tasks) +
                 f" | {_fmt(sum(zs.values()) / len(zs))} | {_fmt(sum(zs[t] / ft[t] for t in tasks) / len(tasks))} |")
    lines.append("| fine-tuned experts † | – | – | " + " | ".join(_fmt(ft[t]) for t in tasks) +
                 f" | {_fmt(sum(ft.values()) / len(ft))} | 100.0 |")
    for r in rows:
        ref = bool(r.get("reference"))
        lines.append(f"| {r['method']}{' †' if ref else ''} | {r['setting']} | {_scale(r['alpha'])} | " +
                     " | ".join(cell(r["per_task"][t], best.get(t), ref) for t in tasks) +
                     f" | {cell(r['avg_abs'], best_avg, ref)} | {norm_cell(r)} |")
    kinds = sorted({r["reference"] for r in rows if r.get("reference")})
    lines += ["", "† reference, not a merge: zero-shot and fine-tuned experts bound the table"
              + "".join(f"; {k}: {REFERENCE_NOTES.get(k, k)}" for k in kinds) + "."]
    if any(r["method"].endswith("+lines") for r in rows):
        lines += ["", "`<method>+lines`: LiNeS (Wang et al., ICLR 2025) on the method's update at scale 1: block l of L "
                  "scaled by alpha + beta·l/(L−1), alpha = ||Σ task vectors|| / (T·||update||) (the authors' rule); "
                  "the scale column is beta, chosen on validation."]
    notes = _same_prediction_notes(results)
    if notes:
        lines += [""] + [f"Note: {n}" for n in notes]
    if any(r.get("per_task_nll") for r in rows):
        zn, fn = results.get("zeroshot_nll", {}), results.get("finetuned_nll", {})
        lines += ["", "## Gold answers' mean token NLL on test (nats; lower is better)", "",
                  "| method | setting | " + " | ".join(tasks) + " | avg |", "|---|---|" + "---:|" * len(tasks) + "---:|"]
        for name, d in ((f"base ({shots}-shot) †", zn), ("fine-tuned experts †", fn)):
            if d:
                lines.append(f"| {name} | – | " + " | ".join(f"{d[t]:.3f}" for t in tasks)
                             + f" | {sum(d.values()) / len(d):.3f} |")
        for r in rows:
            if r.get("per_task_nll"):
                lines.append(f"| {r['method']}{' †' if r.get('reference') else ''} | {r['setting']} | "
                             + " | ".join(f"{r['per_task_nll'][t]:.3f}" for t in tasks) + f" | {r['avg_nll']:.3f} |")
    lines += ["", f"## Normalised test {what} (merged / fine-tuned)", "",
              "| method | setting | " + " | ".join(tasks) + " | avg |",
              "|---|---|" + "---:|" * len(tasks) + "---:|"]
    for r in rows:
        lines.append(f"| {r['method']}{' †' if r.get('reference') else ''} | {r['setting']} | " +
                     " | ".join(_fmt(r["per_task"][t] / ft[t]) for t in tasks) + f" | {_fmt(r['avg_norm'])} |")
    pp = [r for r in results["rows"] if r.get("overhead")]
    if pp:
        lines += ["", "## ESM++ (experts on the val-tuned ESM merge)", "",
                  "| setting | norm | routing acc. | extra params (% of base) | ms / example (static) |",
                  "|---|---:|---:|---:|---|"]
        for r in pp:
            acc = f"{_fmt(r['routing']['accuracy'])}" if r.get("routing") else "– (oracle)"
            lines.append(f"| {r['setting']} | {_fmt(r['avg_norm'])} | {acc} | "
                         f"{r['overhead']['params_pct_of_base']:.2f} | {r['ms_per_example']:.2f} "
                         f"({r['static_ms_per_example']:.2f}) |")
        routed = [r for r in pp if r.get("routing")]
        if routed:
            rep = routed[-1]["routing"]
            lines += ["", f"Routing confusion ({routed[-1]['setting']}, % of a true task's layer decisions):", "",
                      "| true \\ routed | " + " | ".join(rep["tasks"]) + " |", "|" + "---|" * (len(rep["tasks"]) + 1)]
            for t, row in zip(rep["tasks"], rep["confusion"]):
                tot = max(sum(row), 1)
                lines.append(f"| {t} | " + " | ".join(f"{100 * c / tot:.1f}" for c in row) + " |")
    lines += ["", f"## Tasks (95% bootstrap interval of the fine-tuned test {what})", "",
              f"| task | {'distinct answers' if llm else 'classes'} | train | val | test | majority | "
              f"{'base' if llm else 'zero-shot'} | fine-tuned [95% CI] |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for t in tasks:
        i = results["task_info"][t]
        lo, hi = results["finetuned_ci"][t]
        n_classes = len(i["classes"]) if "classes" in i else i.get("distinct_answers_test", "–")
        lines.append(f"| {t} | {n_classes} | {i['n_train']} | {i['n_val']} | {i['n_test']} | "
                     f"{_fmt(i['majority_test'])} | {_fmt(zs[t])} | {_fmt(ft[t])} [{_fmt(lo)}, {_fmt(hi)}] |")
    if results.get("comparisons"):
        lines += ["", "## Paired differences (bootstrap over test examples, 95% CI, normalised points)", "",
                  "| difference | value | 95% CI |", "|---|---:|---|"]
        for k, v in results["comparisons"].items():
            val = v.get("norm_diff", v.get("abs_diff"))
            lines.append(f"| {k} | {100 * val:+.2f} | [{100 * v['ci95'][0]:+.2f}, {100 * v['ci95'][1]:+.2f}] |")
    curves = [r for r in rows if r.get("val_curve")]
    if curves:
        lines += ["", "## Validation curves (mean normalised val accuracy, %, by scale)", ""]
        for r in curves:
            lines.append(f"- {r['method']}: " + ", ".join(f"{_scale(k)}: {100 * v:.1f}"
                                                       for k, v in sorted(r["val_curve"].items(), key=lambda kv: float(kv[0]))))
    return "\n".join(lines) + "\n"


def _reference_rows(results: dict) -> list[tuple[str, float, list[float], str]]:
    """(label, normalised accuracy, per-task normalised, kind) of zero-shot and the fine-tuned experts."""
    tasks, ft, zs = results["tasks"], results["finetuned"], results["zeroshot"]
    zs_per = [zs[t] / ft[t] for t in tasks]
    return [("zero-shot †", float(np.mean(zs_per)), zs_per, "zeroshot"),
            ("fine-tuned experts †", 1.0, [1.0] * len(tasks), "finetuned")]


def plots(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, ft = results["tasks"], results["finetuned"]
    rows = ordered_rows(results)
    colours = {"merge": "tab:blue", "oracle": "tab:orange", "multitask": "tab:green", "zeroshot": "tab:gray",
               "finetuned": "tab:gray"}
    entries = [(r["label"] + (" †" if r.get("reference") else ""), r["avg_norm"], r.get("avg_norm_ci"),
                r.get("reference") or "merge") for r in rows]
    refs = _reference_rows(results)
    entries += [(label, v, None, kind) for label, v, _, kind in refs]
    entries.sort(key=lambda e: -e[1])
    paths = []

    # each row as a point with its 95% interval, on an axis spanning the rows (points, not bars: a bar's length
    # would claim a zero the axis does not show); the value beside each interval, never under it
    fig, ax = plt.subplots(figsize=(8.5, 0.32 * len(entries) + 1.8))
    y = np.arange(len(entries))[::-1]
    vals = np.array([100 * e[1] for e in entries])
    err = np.array([[100 * (e[1] - e[2][0]), 100 * (e[2][1] - e[1])] if e[2] else [0.0, 0.0] for e in entries]).T
    kinds = [e[3] for e in entries]
    described = {"merge": "merged model (one set of weights for every task)",
                 "oracle": "ESM++ told each input's true task: an upper bound, not a deployable merge",
                 "multitask": "one model fine-tuned on all tasks jointly (reference)",
                 "zeroshot": "references: zero-shot base and the fine-tuned experts (= 100)",
                 "finetuned": "references: zero-shot base and the fine-tuned experts (= 100)"}
    for kind in dict.fromkeys(kinds):
        sel = [i for i, k in enumerate(kinds) if k == kind]
        ax.errorbar(vals[sel], y[sel], xerr=err[:, sel], fmt="o", ms=5, color=colours[kind], ecolor=colours[kind],
                    elinewidth=1.2, capsize=2, label=described[kind] if kind != "finetuned" or "zeroshot" not in kinds
                    else None)
    hi_end = vals + err[1]
    for yi, v, end in zip(y, vals, hi_end):
        ax.text(end + 0.4, yi, f"{v:.1f}", va="center", ha="left", fontsize=7,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.3})
    ax.set_yticks(y, [e[0] for e in entries], fontsize=8)
    ax.axvline(100, color="k", lw=0.8, ls="--")
    lo = float(np.min(vals - err[0]))
    ax.set_xlim(max(0.0, np.floor(lo / 5) * 5 - 2), max(100.0, float(np.max(hi_end))) + 5)
    ax.grid(axis="x", color="0.9")
    ax.set_axisbelow(True)
    ax.set_xlabel("normalised test accuracy (% of the fine-tuned experts), 95% bootstrap interval "
                  "(the axis starts near the lowest row)")
    ax.set_title(f"{results['suite']}: {len(tasks)} tasks, seed {results['seed']}  († reference, not a merge)",
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.07), frameon=False)
    fig.tight_layout()
    p = out_dir / "normalized_accuracy.png"
    fig.savefig(p, dpi=120, bbox_inches="tight")
    plt.close(fig)
    paths.append(p)

    # heat map in the same order as the bars, with the references as rows
    labels = [e[0] for e in entries]
    per = {r["label"] + (" †" if r.get("reference") else ""): [r["per_task"][t] / ft[t] for t in tasks] for r in rows}
    per.update({label: v for label, _, v, _ in refs})
    mat = np.array([per[label] for label in labels]) * 100
    fig, ax = plt.subplots(figsize=(1.0 * len(tasks) + 4.5, 0.32 * len(labels) + 2.0))
    im = ax.imshow(mat, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=35, ha="right")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    mid = (mat.max() + mat.min()) / 2
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            ax.text(j, i, f"{mat[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if mat[i, j] < mid else "black")
    cb = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    cb.set_label("% of the fine-tuned expert", rotation=90)
    ax.set_title("normalised test accuracy by row and task (rows as in the bar chart)", fontsize=10)
    fig.tight_layout()
    p = out_dir / "heatmap.png"
    fig.savefig(p, dpi=120, bbox_inches="tight")
    plt.close(fig)
    paths.append(p)
    learned = [r for r in results["rows"] if r.get("coefficients")]
    if learned:  # AdaMerging: the learned coefficients, task x tensor, one panel per variant
        import torch

        from submerge.methods.adamerging import Coefficients

        for r in learned:
            c = r["coefficients"]
            coef = Coefficients(c["tasks"], c["names"], torch.tensor(c["values"]),
                                r["params"].get("granularity", "layer"), r["params"].get("ties_density"))
            slug = r["label"].replace(" ", "_").replace("(", "").replace(")", "").replace("+", "p")
            paths.append(coef.heatmap(out_dir / f"coefficients_{slug}.png"))
    return paths


def write_report(results: dict, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    (out_dir / "results.md").write_text(markdown(results))
    plots(results, out_dir)
