"""Speed and memory of `submerge merge` against mergekit 0.1.5 on the same YAML (a benchmark, not a test).

Builds a synthetic Llama-architecture family (random base, 3 fine-tunes = base + low-rank update +
small noise, ~200M parameters each, bf16, sharded safetensors), then times, for task_arithmetic,
ties and dare_ties:

* ``mergekit-yaml CONFIG OUT`` (mergekit 0.1.5, installed with ``pip install mergekit==0.1.5``),
* ``submerge merge CONFIG OUT``,
* the read-once floor: a plain script that reads every tensor once, adds the task vectors in float32
  and writes the result (task arithmetic only; the other methods have no simpler floor).

Wall time and peak RSS (of the process tree, from getrusage) are the median of --repeats runs;
the page cache is warm after the first run of the first tool (all runs measured warm).
Writes benchmarks/results/merge_speed.md and .json.

    python benchmarks/merge_speed.py [--work DIR] [--repeats 3] [--layers 10]

``--baseline-src DIR`` adds "submerge (baseline)": the ``src`` folder of another checkout (e.g. a git worktree
of an earlier commit), timed in the same interleaved loop, for a paired before/after comparison;
``--skip-mergekit`` leaves mergekit out (its rows are then absent from the report).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

_MEASURE = r"""
import resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
dt = time.perf_counter() - t
if r.returncode:
    sys.stderr.write(r.stderr[-3000:]); sys.exit(r.returncode)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(dt, ru.ru_maxrss, ru.ru_utime + ru.ru_stime)
"""

_FLOOR = r"""
import sys, json, torch
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
base, out, fts = Path(sys.argv[1]), Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]]
def index(d):
    p = d / "model.safetensors.index.json"
    return json.loads(p.read_text())["weight_map"] if p.exists() else None
def opener(d):
    wm = index(d); handles = {}
    def get(name):
        f = wm[name] if wm else "model.safetensors"
        if f not in handles:
            handles.clear(); handles[f] = safe_open(str(d / f), "pt")
        return handles[f].get_tensor(name)
    return get
getters = [opener(d) for d in [base] + fts]
names = list(index(base) or safe_open(str(base / "model.safetensors"), "pt").keys())
out.mkdir(parents=True, exist_ok=True)
result = {}
for name in names:
    b = getters[0](name).float()
    acc = b.clone()
    for g in getters[1:]:
        acc += g(name).float() - b
    result[name] = acc.to(torch.bfloat16)
save_file(result, str(out / "model.safetensors"), metadata={"format": "pt"})
"""


# The model families: "201m" (16k vocabulary, embeddings + LM head 16% of the parameters) and "llm32k", shaped
# like real LLMs (32k vocabulary: embeddings + LM head a third of the parameters; 12 layers).
FAMILIES = {
    "201m": dict(hidden=1024, heads=16, inter=4096, vocab=16000),
    "llm32k": dict(hidden=640, heads=10, inter=2560, vocab=32000, layers=12),
}


def build_family(root: Path, layers: int, family: str = "201m") -> tuple[Path, list[Path]]:
    import torch

    sys.path.insert(0, str(HERE.parent / "src"))
    from submerge.synthetic import llama_config, make_family

    if (root / "ft2" / "config.json").exists():
        return root / "base", [root / f"ft{i}" for i in range(3)]
    shape = dict(FAMILIES[family])
    cfg = llama_config(layers=shape.pop("layers", layers), **shape)
    t = time.perf_counter()
    out = make_family(root, config=cfg, n_finetunes=3, rank=16, update_scale=0.05, noise=2e-4,
                      dtype=torch.bfloat16, seed=0, max_shard_size="200MB")
    print(f"built family in {time.perf_counter() - t:.0f}s", flush=True)
    return out


def measure(cmd: list[str]) -> tuple[float, float]:
    r = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr}")
    dt, kb, cpu = r.stdout.split()
    return float(dt), int(kb) / 1024, float(cpu)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--baseline-src", type=Path, default=None)
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--methods", default="task_arithmetic,ties,dare_ties,passthrough,nuslerp,sce")
    ap.add_argument("--family", choices=sorted(FAMILIES), default="201m")
    ap.add_argument("--report", type=Path, default=None, help="write the report here instead of results/merge_speed")
    args = ap.parse_args()
    import torch
    import yaml

    fam_dir = args.work / ("family" if args.family == "201m" else f"family-{args.family}")
    base, fts = build_family(fam_dir, args.layers, args.family)
    from submerge.io import Checkpoint

    with Checkpoint(base) as ck:
        n_params = sum(info.numel for info in ck.tensors.values())
        n_layers = int(ck.config["num_hidden_layers"])
        args.layers = n_layers
        vocab_share = sum(i.numel for n, i in ck.tensors.items() if "embed" in n or "lm_head" in n) / n_params
    args.vocab_share = vocab_share
    methods = {
        "task_arithmetic": {"weight": 0.5},
        "ties": {"weight": 1.0, "density": 0.3},
        "dare_ties": {"weight": 1.0, "density": 0.3},
        "passthrough": None,
        "nuslerp": None,
        "sce": None,
    }

    def config_for(method: str, params) -> dict:
        if method == "passthrough":  # a frankenmerge: layers [0, h) of ft0 then [h/2, n) of ft1
            h = n_layers // 2
            return {"merge_method": method, "dtype": "bfloat16",
                    "slices": [{"sources": [{"model": str(fts[0]), "layer_range": [0, h]}]},
                               {"sources": [{"model": str(fts[1]), "layer_range": [h // 2, n_layers]}]}]}
        if method == "nuslerp":
            return {"merge_method": method, "base_model": str(base), "dtype": "bfloat16",
                    "models": [{"model": str(fts[0]), "parameters": {"weight": 0.6}},
                               {"model": str(fts[1]), "parameters": {"weight": 0.4}}]}
        if method == "sce":
            return {"merge_method": method, "base_model": str(base), "dtype": "bfloat16",
                    "parameters": {"select_topk": 0.3}, "models": [{"model": str(p)} for p in fts]}
        cfg = {"merge_method": method, "base_model": str(base), "dtype": "bfloat16",
               "models": [{"model": str(p), "parameters": dict(params)} for p in fts]}
        if method == "ties":
            cfg["parameters"] = {"normalize": True}
        return cfg

    mk_bin = shutil.which("mergekit-yaml")
    sm_bin = shutil.which("submerge")
    if (not mk_bin and not args.skip_mergekit) or not sm_bin:
        sys.exit("needs mergekit-yaml (pip install mergekit==0.1.5) and submerge on PATH")
    methods = {m: methods[m] for m in args.methods.split(",")}
    rows = []
    for method, params in methods.items():
        cfg = config_for(method, params)
        cfg_path = args.work / f"{method}-{args.family}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        tools = {
            "mergekit 0.1.5": lambda out: [mk_bin, str(cfg_path), str(out), "--no-copy-tokenizer",
                                           "--random-seed", "0"],
            "submerge": lambda out: [sm_bin, "merge", str(cfg_path), str(out), "-q", "--overwrite",
                                     "--random-seed", "0"],
        }
        if args.skip_mergekit:
            del tools["mergekit 0.1.5"]
        if args.baseline_src is not None:
            runner = f"import sys; sys.path.insert(0, {str(args.baseline_src)!r}); from submerge.cli import run; run()"
            tools["submerge (baseline)"] = lambda out: [sys.executable, "-c", runner, "merge", str(cfg_path), str(out),
                                                        "-q", "--overwrite", "--random-seed", "0"]
        if method == "task_arithmetic":
            tools["read-once floor"] = lambda out: [sys.executable, "-c", _FLOOR, str(base), str(out),
                                                    *map(str, fts)]
        results = {name: [] for name in tools}
        for rep in range(args.repeats):
            for name, make in tools.items():
                out = args.work / f"out-{method}-{name.split()[0]}"
                shutil.rmtree(out, ignore_errors=True)
                dt, rss, cpu = measure(make(out))
                results[name].append((dt, rss, cpu))
                print(f"{method:16s} {name:16s} run {rep}: {dt:7.1f}s  cpu {cpu:7.1f}s  peak RSS {rss:7.0f} MB",
                      flush=True)
                shutil.rmtree(out, ignore_errors=True)
        for name, vals in results.items():
            rows.append({"method": method, "tool": name,
                         "seconds": statistics.median(v[0] for v in vals),
                         "peak_rss_mb": statistics.median(v[1] for v in vals),
                         "cpu_seconds": statistics.median(v[2] for v in vals),
                         "runs": vals})
    write_report(rows, n_params, args)


def write_report(rows: list[dict], n_params: int, args) -> None:
    import torch

    report = args.report or HERE / "results" / "merge_speed"
    report.parent.mkdir(parents=True, exist_ok=True)
    meta = {"params_per_model": n_params, "models": "base + 3 fine-tunes, bf16, 200MB shards",
            "family": args.family, "vocab_share": args.vocab_share, "layers": args.layers, "repeats": args.repeats, "python": platform.python_version(),
            "torch": torch.__version__, "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores"}
    report.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    by = {(r["method"], r["tool"]): r for r in rows}
    floor = by.get(("task_arithmetic", "read-once floor"))
    lines = [
        "# Merge speed: submerge" + (" vs mergekit 0.1.5" if not args.skip_mergekit else "")
        + (" vs an earlier submerge (baseline)" if args.baseline_src else ""),
        "",
        f"Synthetic Llama family `{args.family}`, {n_params / 1e6:.0f}M parameters per model ({args.layers} layers, "
        f"embeddings + LM head {100 * args.vocab_share:.0f}% of them), base + 3 fine-tunes, bf16, "
        f"sharded safetensors; same YAML (`dtype: bfloat16`) for both tools; {meta['machine']}, "
        f"torch {meta['torch']}. Median of {args.repeats} warm-cache runs; peak RSS of the whole process.",
        "Produced by `python benchmarks/merge_speed.py`.",
        "",
        "| method | tool | wall s | CPU s (user+sys) | peak RSS MB | speed-up vs "
        + ("mergekit" if not args.skip_mergekit else "submerge") + " | x read-once floor |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        mk = by.get((method, "mergekit 0.1.5")) or by[(method, "submerge")]
        for r in rows:
            if r["method"] != method:
                continue
            speed = mk["seconds"] / r["seconds"]
            vs_floor = f"{r['seconds'] / floor['seconds']:.2f}" if floor else "–"
            lines.append(f"| {method} | {r['tool']} | {r['seconds']:.1f} | {r.get('cpu_seconds', float('nan')):.1f} | "
                         f"{r['peak_rss_mb']:.0f} | {speed:.2f}x | {vs_floor} |")
    report.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
