"""Markdown table and PNG plots from a results.json dict."""

from __future__ import annotations

from pathlib import Path


def _fmt(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(results: dict) -> str:
    tasks = results["tasks"]
    zs, ft = results["zeroshot"], results["finetuned"]
    rows = results["rows"]
    lines = [
        f"# submerge bench — suite `{results['suite']}`, seed {results['seed']}",
        "",
        f"Backbone: `{Path(results['backbone']['path']).name}` (sha256 {results['backbone']['sha256'][:12]}…, "
        f"{results['backbone']['params'] / 1e6:.1f}M parameters). Frozen zero-shot heads; encoder-only "
        f"fine-tuning; lambda chosen on validation (max mean normalised accuracy); test touched once per row. "
        f"Accuracy in %, normalised = merged / fine-tuned per task, averaged. Best merged value per column in bold. "
        f"Run time {results['seconds_total'] / 60:.1f} min.",
        "",
        *([f"**Warnings:** " + " ".join(f"{w}." for w in results["warnings"]), ""] if results.get("warnings") else []),
        "## Absolute test accuracy",
        "",
        "| method | setting | λ | " + " | ".join(tasks) + " | avg | norm |",
        "|---|---|---:|" + "---:|" * len(tasks) + "---:|---:|",
    ]
    best = {t: max(r["per_task"][t] for r in rows) for t in tasks} if rows else {}
    best_avg = max((r["avg_abs"] for r in rows), default=None)
    best_norm = max((r["avg_norm"] for r in rows), default=None)

    def cell(v: float, b) -> str:
        return f"**{_fmt(v)}**" if b is not None and abs(v - b) < 1e-12 else _fmt(v)

    lines.append("| zero-shot (pre-trained) | – | – | " + " | ".join(_fmt(zs[t]) for t in tasks) +
                 f" | {_fmt(sum(zs.values()) / len(zs))} | {_fmt(sum(zs[t] / ft[t] for t in tasks) / len(tasks))} |")
    lines.append("| fine-tuned experts | – | – | " + " | ".join(_fmt(ft[t]) for t in tasks) +
                 f" | {_fmt(sum(ft.values()) / len(ft))} | 100.0 |")
    for r in rows:
        alpha = "–" if r["alpha"] is None else f"{r['alpha']:g}"
        lines.append(f"| {r['method']} | {r['setting']} | {alpha} | " +
                     " | ".join(cell(r["per_task"][t], best.get(t)) for t in tasks) +
                     f" | {cell(r['avg_abs'], best_avg)} | {cell(r['avg_norm'], best_norm)} |")
    lines += ["", "## Normalised test accuracy (merged / fine-tuned)", "",
              "| method | setting | " + " | ".join(tasks) + " | avg |",
              "|---|---|" + "---:|" * len(tasks) + "---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['setting']} | " +
                     " | ".join(_fmt(r["per_task"][t] / ft[t]) for t in tasks) + f" | {_fmt(r['avg_norm'])} |")
    pp = [r for r in rows if r.get("overhead")]
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
    lines += ["", "## Tasks (95% bootstrap interval of the fine-tuned test accuracy)", "",
              "| task | classes | train | val | test | majority | zero-shot | fine-tuned [95% CI] |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for t in tasks:
        i = results["task_info"][t]
        lo, hi = results["finetuned_ci"][t]
        lines.append(f"| {t} | {len(i['classes'])} | {i['n_train']} | {i['n_val']} | {i['n_test']} | "
                     f"{_fmt(i['majority_test'])} | {_fmt(zs[t])} | {_fmt(ft[t])} [{_fmt(lo)}, {_fmt(hi)}] |")
    if results.get("comparisons"):
        lines += ["", "## Paired differences (bootstrap over test examples, 95% CI, points)", "",
                  "| difference | value | 95% CI |", "|---|---:|---|"]
        for k, v in results["comparisons"].items():
            val = v.get("norm_diff", v.get("abs_diff"))
            lines.append(f"| {k} | {100 * val:+.2f} | [{100 * v['ci95'][0]:+.2f}, {100 * v['ci95'][1]:+.2f}] |")
    curves = [r for r in rows if r.get("val_curve")]
    if curves:
        lines += ["", "## Validation curves (mean normalised val accuracy by λ)", ""]
        for r in curves:
            lines.append(f"- {r['method']}: " + ", ".join(f"{k}: {100 * v:.1f}" for k, v in r["val_curve"].items()))
    return "\n".join(lines) + "\n"


def plots(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks, ft, rows = results["tasks"], results["finetuned"], results["rows"]
    paths = []
    labels = ["zero-shot"] + [r["label"] for r in rows]
    zs_norm = sum(results["zeroshot"][t] / ft[t] for t in tasks) / len(tasks)
    values = [zs_norm] + [r["avg_norm"] for r in rows]
    order = np.argsort(values)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(labels) + 1.2))
    ax.barh([labels[i] for i in order], [100 * values[i] for i in order], color="tab:blue")
    ax.axvline(100, color="k", lw=0.8, ls="--")
    ax.set_xlabel("normalised accuracy (% of fine-tuned), test")
    ax.set_title(f"{results['suite']}: {len(tasks)} tasks, seed {results['seed']}")
    ax.set_xlim(min(100 * min(values) - 5, 95), 102)
    fig.tight_layout()
    p = out_dir / "normalized_accuracy.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)

    mat = np.array([[r["per_task"][t] / ft[t] for t in tasks] for r in rows]) * 100 if rows else np.zeros((1, len(tasks)))
    fig, ax = plt.subplots(figsize=(1.1 * len(tasks) + 3, 0.35 * max(len(rows), 1) + 1.8))
    im = ax.imshow(mat, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=35, ha="right")
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows])
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            ax.text(j, i, f"{mat[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if mat[i, j] < mat.mean() else "black")
    fig.colorbar(im, ax=ax, label="% of fine-tuned")
    ax.set_title("normalised test accuracy by method and task")
    fig.tight_layout()
    p = out_dir / "heatmap.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    return paths


def write_report(results: dict, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    (out_dir / "results.md").write_text(markdown(results))
    plots(results, out_dir)
