"""``analysis.json`` (everything, for scripts), ``analysis.md`` (the findings, for people) and the PNGs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from submerge.analysis.weights import NEGLIGIBLE


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf as null, tensors dropped."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items() if not _is_tensor(v)}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _is_tensor(v: Any) -> bool:
    return type(v).__name__ == "Tensor"


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _fmt(x: Optional[float], nd: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _pairs(tasks: list[str], m: list[list[float]]) -> list[tuple[float, str, str]]:
    return [(m[i][j], tasks[i], tasks[j]) for i in range(len(tasks)) for j in range(i + 1, len(tasks))
            if m[i][j] is not None and math.isfinite(m[i][j])]


def write_report(result: dict, out: Path) -> None:
    (out / "analysis.json").write_text(json.dumps(_clean(result), indent=1) + "\n")
    figures = _plots(result, out)
    (out / "analysis.md").write_text(_markdown(result, figures))


# ---------------------------------------------------------------------------------------------- markdown
def _markdown(r: dict, figures: list[str]) -> str:
    w = r["weights"]
    tasks = w["tasks"]
    L = [f"# Merge analysis: {len(tasks)} experts of `{r['base']}`", "",
         f"Config `{r['config']}`, merge `{r['merge_method']}`; {w['tensors']} tensors streamed in "
         f"{w['seconds']} s (total {r['seconds']} s).", ""]
    L += ["## Task vectors (data-free)", "",
          f"Mean pairwise cosine {_fmt(w['mean_cosine'])}; entries touched by two or more tasks where some task "
          f"disagrees with the elected sign: {_fmt(100 * w['elected_sign_conflict'], 1)}%.", "",
          "| task | ‖τ‖ | " + " | ".join(tasks) + " |", "|---|---:|" + "---:|" * len(tasks)]
    for i, t in enumerate(tasks):
        L.append(f"| {t} | {_fmt(w['norm'][i], 2)} | " + " | ".join(_fmt(x) for x in w["cosine"][i]) + " |")
    L += ["", "(cosine of the whole task vectors)", ""]
    sc = sorted(_pairs(tasks, w["sign_conflict"]), reverse=True)
    iou = sorted(_pairs(tasks, w["topk_iou"]), reverse=True)
    cos = sorted(_pairs(tasks, w["cosine"]))
    if len(sc) == 1:  # two tasks: one pair, said once
        (v_s, a, b), (v_i, _, _), (v_c, _, _) = sc[0], iou[0], cos[0]
        L += [f"- {a}/{b}: sign conflict (share of co-touched entries with opposite signs) {100 * v_s:.1f}%; "
              f"top-{round(100 * w['topk'])}% mask overlap (IoU) {v_i:.3f}; cosine {v_c:.3f}.", ""]
    elif sc:
        L += ["- Most sign conflict (share of co-touched entries with opposite signs): "
              + ", ".join(f"{a}/{b} {100 * v:.1f}%" for v, a, b in sc[:3])
              + f"; least: {sc[-1][1]}/{sc[-1][2]} {100 * sc[-1][0]:.1f}%.",
              f"- Most overlapping top-{round(100 * w['topk'])}% masks (IoU): "
              + ", ".join(f"{a}/{b} {v:.3f}" for v, a, b in iou[:3]) + ".",
              "- Least aligned (cosine): " + ", ".join(f"{a}/{b} {v:.3f}" for v, a, b in cos[:3])
              + f"; most aligned: {cos[-1][1]}/{cos[-1][2]} {cos[-1][0]:.3f}.", ""]
    mats = set(w.get("matrix_families") or w["mean_cosine_by_family"])
    fam = sorted(((v, f) for f, v in w["mean_cosine_by_family"].items()
                  if f in mats and v is not None and math.isfinite(v)), reverse=True)
    if fam:
        L += ["Weight-matrix families by mean pairwise cosine (highest first; all families in analysis.json):", ""] + [f"- `{f}`: {v:.3f}" for v, f in fam[:6]] + ["- …"] * (len(fam) > 6) + [""]
    sp = w["spectra"]
    if sp:
        ratio = [(x["overlap_left"] / x["chance_left"], x) for x in sp
                 if x["chance_left"] and x["overlap_left"] is not None and math.isfinite(x["overlap_left"])]
        ratio.sort(key=lambda p: -p[0])
        er = sum(sum(x["effective_rank"]) / len(tasks) for x in sp) / len(sp)
        both = [x for x in sp if _finite(x["overlap_left"]) and _finite(x["overlap_right"])]
        n = max(len(both), 1)
        L += ["## Spectra", "",
              f"{len(sp)} matrices; mean effective rank of a task's update {er:.1f}; mean overlap of two tasks' "
              f"top-k left singular subspaces {sum(x['overlap_left'] for x in both) / n:.3f} (right "
              f"{sum(x['overlap_right'] for x in both) / n:.3f}) against {sum(x['chance_left'] for x in both) / n:.3f} "
              f"for random subspaces (over the {len(both)} matrices two tasks both change).", "",
              "Where tasks interfere most (left overlap over chance):", ""]
        L += [f"- `{x['name']}`: {x['overlap_left']:.3f} ({q:.1f}x chance, k = {x['k']})" for q, x in ratio[:5]]
        L += [""]
    untouched = w.get("untouched") or []
    if untouched:
        L += [f"Untouched by every task (task vectors zero, or below {NEGLIGIBLE:g} of the weight's norm), so never "
              f"counted as interference: {len(untouched)} tensor(s), "
              + ", ".join(f"`{n}`" for n in untouched[:5]) + (" …" if len(untouched) > 5 else "") + ".", ""]
    e = r.get("essential")
    if e and e.get("layers"):
        L += ["## ESM's view (calibration statistics)", "",
              "| role | layers | k90 essential | k90 weight | overlap essential | overlap weight |",
              "|---|---:|---:|---:|---:|---:|"]
        for role, d in sorted(e["by_role"].items()):
            L.append(f"| {role} | {d['layers']} | {d['k90_essential']:.1f} | {d['k90_weight']:.1f} | "
                     f"{_fmt(d['overlap_essential'])} | {_fmt(d['overlap_weight'])} |")
        corr = e.get("overlap_correlation")
        L += ["", f"Across layers, the essential overlap and the weight overlap correlate at r = {_fmt(corr)}; "
              f"mean {_fmt(e['mean_overlap_essential'])} (essential) vs {_fmt(e['mean_overlap_weight'])} (weight). "
              "When the two agree the data add little to what the weights show; an essential rank well below "
              "the weight rank means the data concentrate each update.", ""]
    elif e:
        L += ["## ESM's view", "", f"No layer had statistics in every model ({e['n_missing']} missing).", ""]
    p = r.get("paths")
    if p:
        L += ["## Scored (validation data)", "", "| task | base | expert | merge | retention | base→expert barrier "
              "(loss) | expert→merge barrier (loss) | ECE expert | ECE merge |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        b2e = {rec["to"].split(":", 1)[1]: rec for rec in p["base_to_expert"]}
        e2m = {rec["from"].split(":", 1)[1]: rec for rec in p["expert_to_merge"]}
        for t in tasks:
            cal = p["calibration"].get(t, {})
            L.append(f"| {t} | {_fmt(p['scores']['base'][t])} | {_fmt(p['scores']['expert'][t])} | "
                     f"{_fmt(p['scores']['merge'][t])} | {_fmt(p['retention'][t])} | "
                     f"{_fmt(b2e[t]['tasks'][t]['loss_barrier'])} | {_fmt(e2m[t]['tasks'][t]['loss_barrier'])} | "
                     f"{_fmt(cal.get('expert', {}).get('ece'))} | {_fmt(cal.get('merge', {}).get('ece'))} |")
        L += ["", f"Mean retention (merge over expert, the survey's task retention rate): "
              f"{_fmt(p['mean_retention'])}."]
        if p.get("mean_ece"):
            m = p["mean_ece"]
            L += [f"Mean ECE: experts {_fmt(m['expert'])}, merge {_fmt(m['merge'])}, base {_fmt(m['base'])} "
                  f"(an embedding head's logit scale is fitted on its expert; see the module docs)."]
        if p["pairs"]:
            L += ["", "Barriers between experts (mean over the pair's two tasks, loss):", "",
                  "| pair | linear | SLERP |", "|---|---:|---:|"]
            by = {}
            for rec in p["pairs"]:
                key = (rec["from"].split(":", 1)[1], rec["to"].split(":", 1)[1])
                vals = [v["loss_barrier"] for v in rec["tasks"].values() if v["loss_barrier"] is not None]
                by.setdefault(key, {})[rec["kind"]] = sum(vals) / len(vals) if vals else None
            for (a, b), d in sorted(by.items(), key=lambda kv: -(kv[1].get("linear") or 0)):
                L.append(f"| {a} / {b} | {_fmt(d.get('linear'))} | {_fmt(d.get('slerp'))} |")
        L += ["", f"{p['evaluations']} task evaluations in {p['seconds']} s.", ""]
    if figures:
        L += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------- plots
def _heat(ax, m, labels, title, fmt="{:.2f}", vmin=None, vmax=None, cmap="viridis"):
    import numpy as np

    a = np.array([[np.nan if v is None else v for v in row] for row in m], dtype=float)
    im = ax.imshow(a, vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title(title, fontsize=9)
    if len(labels) <= 10:
        for i in range(a.shape[0]):
            for j in range(a.shape[1]):
                if np.isfinite(a[i, j]):
                    ax.text(j, i, fmt.format(a[i, j]), ha="center", va="center", fontsize=6, color="w")
    return im


def _save(fig, path: Path, files: list[str]) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path.name)


def _plots(r: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = r["weights"]
    tasks = w["tasks"]
    files = []
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, im, label in (
            (axes[0], _heat(axes[0], w["cosine"], tasks, "cosine of task vectors",
                            vmin=-1 if w["mean_cosine"] < 0 else 0, vmax=1), "cosine"),
            (axes[1], _heat(axes[1], w["sign_conflict"], tasks, "sign conflict (co-touched entries)", fmt="{:.2f}",
                            vmin=0, vmax=0.5, cmap="magma"), "share of entries with opposite signs"),
            (axes[2], _heat(axes[2], w["topk_iou"], tasks, f"top-{round(100 * w['topk'])}% mask IoU", vmin=0, vmax=1),
             "intersection over union")):
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label(label, fontsize=8)
    _save(fig, out / "task_vectors.png", files)

    blocks = sorted(int(b) for b in w["norm_by_block"])
    if blocks:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for i, t in enumerate(tasks):
            axes[0].plot(blocks, [w["norm_by_block"][str(b)][i] for b in blocks], marker=".", label=t)
        axes[0].set(title="‖τ‖ per block", xlabel="block")
        axes[0].legend(fontsize=6)
        axes[1].plot(blocks, [w["mean_cosine_by_block"][str(b)] for b in blocks], marker="o")
        axes[1].set(title="mean pairwise cosine per block", xlabel="block")
        sp = [x for x in w["spectra"] if x["block"] is not None]
        if sp:
            def per_block(key):
                return [sum(x[key] for x in sp if x["block"] == b) / max(1, sum(1 for x in sp if x["block"] == b))
                        for b in blocks]
            axes[2].plot(blocks, per_block("overlap_left"), marker="o", label="left (output)")
            axes[2].plot(blocks, per_block("overlap_right"), marker="s", label="right (input)")
            axes[2].plot(blocks, per_block("chance_left"), ls="--", color="gray", label="chance (left)")
            axes[2].set(title="top-k singular subspace overlap per block", xlabel="block")
            axes[2].legend(fontsize=7)
        _save(fig, out / "layers.png", files)

    e = r.get("essential")
    if e and e.get("layers"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
        roles = sorted({x["role"] for x in e["layers"]})
        for role in roles:
            xs = [x for x in e["layers"] if x["role"] == role]
            axes[0].scatter([sum(x["k90_weight"]) / len(x["k90_weight"]) for x in xs],
                            [sum(x["k90_essential"]) / len(x["k90_essential"]) for x in xs], s=12, label=role)
            ys = [x for x in xs if x["overlap_weight"] is not None]
            axes[1].scatter([x["overlap_weight"] for x in ys], [x["overlap_essential"] for x in ys], s=12, label=role)
        for ax in axes:
            lim = max(ax.get_xlim()[1], ax.get_ylim()[1])
            ax.plot([0, lim], [0, lim], ls="--", color="gray", lw=0.8)
        axes[0].set(title="rank for 90% energy", xlabel="weight SVD (‖ΔW‖²)", ylabel="essential (feature shift)")
        axes[1].set(title="overlap of two tasks' top-k subspaces", xlabel="weight (left singular)",
                    ylabel="essential")
        axes[0].legend(fontsize=7)
        _save(fig, out / "essential.png", files)

    p = r.get("paths")
    if p:
        fig, axes = plt.subplots(1, 3 if p["pairs"] else 2, figsize=(15 if p["pairs"] else 10, 4.2))
        for rec in p["base_to_expert"]:
            for t, c in rec["tasks"].items():
                if all(v is not None for v in c["loss"]):
                    axes[0].plot(rec["t"], c["loss"], marker=".", label=t)
        axes[0].set(title="loss: base (t=0) → expert (t=1)", xlabel="t")
        axes[0].legend(fontsize=6)
        for rec in p["expert_to_merge"]:
            for t, c in rec["tasks"].items():
                if all(v is not None for v in c["loss"]):
                    axes[1].plot(rec["t"], c["loss"], marker=".", label=t)
        axes[1].set(title="loss: expert (t=0) → merge (t=1)", xlabel="t")
        if p["pairs"]:
            idx = {t: i for i, t in enumerate(tasks)}
            m = [[None] * len(tasks) for _ in tasks]
            for rec in p["pairs"]:
                a, b = rec["from"].split(":", 1)[1], rec["to"].split(":", 1)[1]
                vals = [v["loss_barrier"] for v in rec["tasks"].values() if v["loss_barrier"] is not None]
                if vals:
                    v = sum(vals) / len(vals)
                    if rec["kind"] == "linear":
                        m[idx[a]][idx[b]] = v
                    else:
                        m[idx[b]][idx[a]] = v
            _heat(axes[2], m, tasks, "pair barrier (loss): linear above, SLERP below", cmap="magma")
        _save(fig, out / "paths.png", files)
        cal = p.get("calibration") or {}
        if cal:
            n = len(cal)
            cols = min(4, n)
            rows = (n + cols - 1) // cols
            fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
            for ax, (t, c) in zip(axes.flat, cal.items()):
                ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=0.8)
                for who, mk in (("expert", "o"), ("merge", "s")):
                    bins = [b for b in c[who]["bins"] if b["n"]]
                    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker=mk, ms=3,
                            label=f"{who} ECE {c[who]['ece']:.3f}")
                ax.set_title(t, fontsize=8)
                ax.set_xlabel("confidence (max predicted probability)", fontsize=7)
                ax.set_ylabel("accuracy in that confidence bin", fontsize=7)
                ax.set(xlim=(0, 1), ylim=(0, 1))
                ax.legend(fontsize=6)
            for ax in list(axes.flat)[n:]:
                ax.axis("off")
            fig.suptitle("reliability: accuracy against confidence", fontsize=9)
            _save(fig, out / "reliability.png", files)
    return files
