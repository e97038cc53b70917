"""How much the LLM suite's LoRA experts share their subspaces (a benchmark, not a test).

For every adapted linear layer and every pair of skills (s, t), the overlap of the two updates' column spaces
``‖U_sᵀ U_t‖_F² / r`` (U: orthonormal basis of the column space of ΔW = B·A, r its rank; 0 = orthogonal,
1 = the same space), and the same for their row spaces, averaged per kind of layer, beside what two random
r-dimensional subspaces of that width give (r / d).  TSV-M and Iso-C/CTS work by decorrelating the task
updates' singular subspaces: where the subspaces already barely overlap, they have little to remove.

    python benchmarks/llm_subspace_overlap.py benchmarks/results/llm/lora-seed0/results.json

The adapters are read from the LLM cache (``~/.cache/submerge/llm/experts``): each skill's expert is the folder its
training log in the results file names (``key``), or, for runs that did not record it, the cached adapter whose
training log (seed, steps, first and last loss) is the one the results file records.  Writes
``subspace_overlap.json`` and ``.md`` beside the results file.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import defaultdict
from pathlib import Path

import torch


def adapter_folders(results: dict, cache: Path) -> dict[str, Path]:
    """Each skill's cached adapter folder, found by the training log results.json keeps for it."""
    def sig(log: dict) -> tuple:
        return (log["seed"], log["steps"], log["n_train"], *(round(x, 7) for x in log["loss_first_last"]))

    found = {task: cache / log["key"] for task, log in results["finetune_log"].items()
             if task in results["tasks"] and (cache / log.get("key", "-") / "adapter_model.safetensors").is_file()}
    want = {sig(log): task for task, log in results["finetune_log"].items()
            if task in results["tasks"] and task not in found}  # runs before the key was recorded
    for f in cache.glob("*/submerge_finetune.json"):
        task = want.get(sig(json.loads(f.read_text())))
        if task is not None and (f.parent / "adapter_model.safetensors").is_file():
            found[task] = f.parent
    missing = sorted(set(results["tasks"]) - set(found))
    if missing:
        raise SystemExit(f"error: no cached adapter for {', '.join(missing)} under {cache}: run the bench first")
    return found


def basis(x: torch.Tensor, rel: float = 1e-9) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    return u[:, : int((s > rel * s[0]).sum())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "submerge" / "llm" / "experts")
    args = ap.parse_args()
    from safetensors.torch import load_file

    results = json.loads(args.results.read_text())
    folders = adapter_folders(results, args.cache)
    tasks = results["tasks"]
    adapters = {t: load_file(folders[t] / "adapter_model.safetensors") for t in tasks}
    layers = sorted({k.rsplit(".lora_", 1)[0] for k in adapters[tasks[0]] if ".lora_B." in k})
    per_kind = defaultdict(lambda: {"col": [], "row": [], "d_out": 0, "d_in": 0, "rank": 0})
    for layer in layers:
        cols, rows = [], []
        for t in tasks:
            delta = adapters[t][layer + ".lora_B.weight"].double() @ adapters[t][layer + ".lora_A.weight"].double()
            cols.append(basis(delta))
            rows.append(basis(delta.T))
        k = per_kind[layer.rsplit(".", 1)[-1]]
        k["d_out"], k["d_in"], k["rank"] = cols[0].shape[0], rows[0].shape[0], cols[0].shape[1]
        for i, j in itertools.combinations(range(len(tasks)), 2):
            k["col"].append(float((cols[i].T @ cols[j]).pow(2).sum() / min(cols[i].shape[1], cols[j].shape[1])))
            k["row"].append(float((rows[i].T @ rows[j]).pow(2).sum() / min(rows[i].shape[1], rows[j].shape[1])))
    out = {"results": str(args.results), "tasks": tasks, "layers": len(layers), "kinds": {}}
    lines = [f"# Subspace overlap of the LLM suite's LoRA experts ({args.results.parent.name})", "",
             f"{len(tasks)} skills, {len(layers)} adapted linear layers; per pair of skills and layer, "
             "‖U_sᵀU_t‖²_F / r of the updates' column (output) and row (input) spaces; random: r / d for two random "
             "r-dimensional subspaces of that width. Produced by `python benchmarks/llm_subspace_overlap.py`.", "",
             "| layer kind | d_out × d_in | rank | column overlap mean (max) | random "
             "| row overlap mean (max) | random |",
             "|---|---|---:|---|---:|---|---:|"]
    for kind, k in sorted(per_kind.items()):
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        out["kinds"][kind] = {"d_out": k["d_out"], "d_in": k["d_in"], "rank": k["rank"],
                              "col_mean": mean(k["col"]), "col_max": max(k["col"]),
                              "col_random": k["rank"] / k["d_out"],
                              "row_mean": mean(k["row"]), "row_max": max(k["row"]), "row_random": k["rank"] / k["d_in"]}
        o = out["kinds"][kind]
        lines.append(f"| {kind} | {k['d_out']} × {k['d_in']} | {k['rank']} | {o['col_mean']:.3f} ({o['col_max']:.3f}) "
                     f"| {o['col_random']:.3f} | {o['row_mean']:.3f} ({o['row_max']:.3f}) | {o['row_random']:.3f} |")
    stem = args.results.parent / "subspace_overlap"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
