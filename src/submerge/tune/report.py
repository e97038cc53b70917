"""``tune.md``, ``tune.png`` and the model card's tuning section, from the ``tune.json`` report."""

from __future__ import annotations

from pathlib import Path


def _fmt_scale(x) -> str:
    return "-" if x is None else format(x, ".4g")


def write_markdown(report: dict, path: Path) -> None:
    tasks = [t["name"] for t in report["tasks"]]
    w = report["winner"]
    obj = report["objective"]["kind"]
    lines = [
        "# submerge tune", "",
        f"Validation data only. Objective: **{obj}** of the normalised scores (each task's score over its own "
        f"expert's). Backend: {report['backend']}.", "",
        f"**Winner: {w['label']}** — objective {w['objective']:.4f}; written beside this file.", "",
        "## Experts on their own tasks (the normalisation)", "",
        "| task | scorer | expert score |", "|---|---|---|",
    ]
    for t in report["tasks"]:
        lines.append(f"| {t['name']} | {t['scorer']} | {report['expert_scores'][t['name']]:.4f} |")
    lines += ["", "## Candidates (best point of each)", "",
              "| candidate | scale | objective | " + " | ".join(tasks) + " | points | seconds |",
              "|---|---:|---:|" + "---:|" * len(tasks) + "---:|---:|"]
    order = sorted(report["candidates"], key=lambda c: -(c["best"]["objective"] if c["best"] else -1e9))
    for c in order:
        if c["error"]:
            lines.append(f"| {c['label']} | - | **failed** | " + " | ".join("-" for _ in tasks)
                         + f" | {len(c['points'])} | {c['seconds']:.1f} |")
            continue
        b = c["best"]
        mark = " (winner)" if c["index"] == w["index"] else ""
        lines.append(f"| {c['label']}{mark} | {_fmt_scale(b['scale'])} | {b['objective']:.4f} | "
                     + " | ".join(f"{b['normalized'][t]:.4f}" for t in tasks)
                     + f" | {len(c['points'])} | {c['seconds']:.1f} |")
    lines += ["", "Task columns: normalised score at the candidate's best point.", ""]
    learned = [c for c in report["candidates"] if c["best"] and c["best"].get("learned")]
    if learned:
        lines += ["## AdaMerging (learned on the eval texts, labels unused)", "",
                  "| candidate | entropy first -> last | mean coefficient per task |", "|---|---|---|"]
        for c in learned:
            j = c["best"]["learned"]
            first, last = j.get("loss_first_last") or (float("nan"), float("nan"))
            means = ", ".join(f"{t} {sum(row) / max(len(row), 1):.3f}" for t, row in zip(j["tasks"], j["coefficients"]))
            lines.append(f"| {c['label']} | {first:.4f} -> {last:.4f} | {means} |")
        lines.append("")
    if report["errors"]:
        lines += ["## Failed candidates", ""] + [f"- {e}" for e in report["errors"]] + [""]
    lines += ["## Every point", ""]
    for c in report["candidates"]:
        if not c["points"]:
            continue
        pts = ", ".join(f"{_fmt_scale(p['scale'])}: {p['objective']:.4f}" for p in c["points"])
        lines.append(f"- {c['label']} ({c['strategy'] or 'one merge'}): {pts}")
    lines.append("")
    path.write_text("\n".join(lines))


def write_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    fixed = []
    for c in report["candidates"]:
        pts = [p for p in c["points"] if p["scale"] is not None]
        if len(pts) > 1:
            ax.plot([p["scale"] for p in pts], [p["objective"] for p in pts], marker="o", ms=3, label=c["label"])
        elif c["best"] is not None:
            fixed.append(c)
    for c in fixed:
        ax.axhline(c["best"]["objective"], ls=":", lw=1, label=f"{c['label']} (no scale)")
    w = report["winner"]
    wb = next(c["best"] for c in report["candidates"] if c["index"] == w["index"])
    if wb["scale"] is not None:
        ax.plot([wb["scale"]], [wb["objective"]], marker="*", ms=14, color="k", ls="none", label="winner")
    ax.set_xlabel("scale (lambda / alpha)")
    ax.set_ylabel(f"objective ({report['objective']['kind']} normalised, validation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def append_card(report: dict, card: Path) -> None:
    if not card.exists():
        return
    w = report["winner"]
    lines = ["", "## Tuning", "",
             f"Chosen by `submerge tune` among {len(report['candidates'])} candidate(s) on validation data "
             f"(objective: {report['objective']['kind']} normalised score; `tune.md` has every candidate).", "",
             "| task | scorer | normalised | score | expert |", "|---|---|---:|---:|---:|"]
    for t in report["tasks"]:
        n = t["name"]
        lines.append(f"| {n} | {t['scorer']} | {w['normalized'][n]:.4f} | {w['scores'][n]:.4f} | "
                     f"{report['expert_scores'][n]:.4f} |")
    lines.append("")
    card.write_text(card.read_text() + "\n".join(lines))
