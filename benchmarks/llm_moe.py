"""An MoE of the LLM suite's experts beside ESM++ and TALL masks (issue 33): accuracy, parameters, memory and time
per question on the same questions.  A benchmark, not a test.

The experts (the suite's cached LoRA experts, as ``base+adapter``) become a Mixtral-style MoE through
``submerge moe``: mergekit-moe's ``hidden`` gates (each expert's positive prompts: chat-formatted training
questions of its skill, run through the base model) and submerge's ``calibration`` gates (each expert's mean MLP
input from calibration statistics, no prompts), two experts per token (mergekit-moe's default).  Attention and
embeddings come from the base model, as mergekit-moe builds them.  An MoE has no scale to choose, so test is
touched once per gate mode; val is reported beside it.  The ESM++ and TALL rows are read from the canonical
table (``--results``, a ``results.json`` of ``submerge bench --suite llm``), where they were scored on the same
test questions.

    python benchmarks/llm_moe.py --results benchmarks/results/llm/lora-seed0/results.json [--threads 2]

Writes benchmarks/results/llm/moe.json and moe.md.  ``--compare-only`` recomputes nothing: it reads the MoE rows
of an earlier ``moe.json`` and takes the compared rows afresh from ``--results`` (a table that has grown since).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    from submerge.bench.llm.moe import GATE_MODES, moe_rows
    from submerge.bench.llm.session import LLMBenchConfig, LLMSession

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=None, help="the canonical results.json (ESM++ / TALL rows)")
    ap.add_argument("--gates", default=",".join(GATE_MODES))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "llm")
    ap.add_argument("--compare-only", action="store_true", help="refresh the compared rows of OUT/moe.json")
    args = ap.parse_args()
    if args.compare_only:
        out = json.loads((args.out / "moe.json").read_text())
        out["compared"] = compare(args.results) if args.results else []
        write(args.out, out)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    S = LLMSession(LLMBenchConfig(seed=args.seed, multitask=False))
    with tempfile.TemporaryDirectory(prefix="submerge-llm-moe-") as tmp:
        rows = moe_rows(S, Path(tmp), args.gates.split(","))
    for r in rows:
        print(f"{r['label']}: norm {100 * r['avg_norm']:.1f}, val norm {100 * r['val_norm']:.1f}, "
              f"{r['params'] / 1e6:.0f}M params, {r['ms_per_question']:.0f} ms/question", flush=True)
    out = {"suite": "llm", "seed": args.seed, "tasks": S.names, "backbone": S.cm.name,
           "threads": torch.get_num_threads(), "base_params": sum(p.numel() for p in S.cm.model.parameters()), "rows": rows,
           "compared": compare(args.results) if args.results else []}
    write(args.out, out)


def write(folder: Path, out: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "moe.json").write_text(json.dumps(out, indent=1) + "\n")
    (folder / "moe.md").write_text(markdown(out))
    print((folder / "moe.md").read_text())


def compare(results: Path) -> list[dict]:
    """The canonical table's routed and per-task rows (ESM++, TALL masks) and the best static rows."""
    d = json.loads(results.read_text())
    keep = [r for r in d["rows"] if r["method"] in ("esm_pp", "tall_masks", "task_arithmetic", "tsv", "esm")]
    return [{k: r.get(k) for k in ("method", "setting", "label", "per_task", "avg_abs", "avg_norm", "avg_norm_ci",
                                    "seconds", "routing", "params_extra")} for r in keep]


def markdown(out: dict) -> str:
    tasks = out["tasks"]
    lines = [f"# An MoE of the LLM suite's experts beside ESM++ and TALL masks (seed {out['seed']})", "",
             f"Backbone {out['backbone']} ({out['base_params'] / 1e6:.1f}M parameters); {out['threads']} threads. "
             "MoE: `submerge moe`, Mixtral, 2 experts per token, experts' MLPs from each skill's LoRA expert, "
             "attention and embeddings from the base (as mergekit-moe builds them). Test exact match in %.", "",
             "| model | params | " + " | ".join(tasks) + " | avg | norm [95% CI] | val norm | ms / question |",
             "|---|---:|" + "---:|" * len(tasks) + "---:|---|---:|---:|"]
    for r in out["rows"]:
        lo, hi = r["avg_norm_ci"]
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.0f}M | " + " | ".join(f"{100 * r['per_task'][t]:.1f}"
                                                                               for t in tasks)
                     + f" | {100 * r['avg_abs']:.1f} | {100 * r['avg_norm']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] "
                       f"| {100 * r['val_norm']:.1f} | {r['ms_per_question']:.0f} |")
    for r in out["compared"]:
        ci = r.get("avg_norm_ci") or [float("nan")] * 2
        lines.append(f"| {r['label']} (canonical table) | – | " + " | ".join(f"{100 * r['per_task'][t]:.1f}"
                                                                         for t in tasks)
                     + f" | {100 * r['avg_abs']:.1f} | {100 * r['avg_norm']:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}] "
                       "| – | – |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
