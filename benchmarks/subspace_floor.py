"""How much of a subspace merge is exact linear algebra: the floor under issue 32's CPU ratios (a benchmark).

On the family of ``benchmarks/esm_speed.py`` (build it there first: ``--layers 2`` is the 66M family), each merge
runs in a child process whose ``torch.linalg.svd`` and ``torch.linalg.eigh`` are wrapped by a timer: the child
reports its wall time and, per decomposition and shape, the calls and the seconds spent inside LAPACK.  Those
seconds are a lower bound for any implementation that computes the same exact float64 decompositions, whatever it
does around them; divided by task arithmetic's wall time they bound the ratio issue 32 asks about from below.
Task arithmetic runs through the same wrapper, interleaved with the others, ``--repeats`` times; the medians are
reported.  Writes ``benchmarks/results/<name>.md`` and ``.json``.

    python benchmarks/subspace_floor.py [--work /tmp/submerge-esm-speed] [--threads 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent

_CHILD = r"""
import json, os, sys, time
import torch
calls = {}
def timed(name):
    inner = getattr(torch.linalg, name)
    def call(x, *a, **k):
        t = time.perf_counter()
        out = inner(x, *a, **k)
        dt = time.perf_counter() - t
        key = f"{name} {'x'.join(map(str, x.shape))} {str(x.dtype).replace('torch.', '')}"
        c = calls.setdefault(key, [0, 0.0])
        c[0] += 1
        c[1] += dt
        return out
    setattr(torch.linalg, name, call)
for name in ("svd", "eigh"):
    timed(name)
from submerge.cli import main
t = time.perf_counter()
try:
    main(sys.argv[2:], standalone_mode=False)
finally:
    wall = time.perf_counter() - t
    with open(sys.argv[1], "w") as f:
        json.dump({"wall": wall, "calls": calls}, f)
"""


def run_child(args: list[str], report: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD, str(report), *args], capture_output=True, text=True, env=env)
    process = time.perf_counter() - t
    if out.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    rec = json.loads(report.read_text())
    rec["process"] = process
    rec["lapack"] = sum(s for _, s in rec["calls"].values())
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/submerge-esm-speed"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", default="task_arithmetic,tsv,iso_cts,esm")
    ap.add_argument("--name", default="subspace_floor")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()
    fam = args.work / "family"
    if not (fam / "ft3").exists():
        raise SystemExit(f"no family under {fam}: run python benchmarks/esm_speed.py --layers 2 --work {args.work}")
    fts = [fam / f"ft{i}" for i in range(4)]
    methods = args.methods.split(",")
    calib = [args.work / f"stats{i}" for i in range(4)]
    if "esm" in methods:
        for i, (ft, out) in enumerate(zip(fts, calib)):
            if not out.exists():
                inputs = args.work / f"inputs{i}.pt"
                if not inputs.exists():
                    g = torch.Generator().manual_seed(i)
                    torch.save({"input_ids": torch.randint(0, 16000, (32, 128), generator=g),
                                "attention_mask": torch.ones(32, 128, dtype=torch.long)}, inputs)
                run_child(["calibrate", str(ft), str(inputs), str(out), "-n", "32", "-q"], args.work / "child.json",
                          args.threads)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for rep in range(args.repeats):
        for method in methods:
            cfg = {"merge_method": method, "base_model": str(fam / "base"), "dtype": "bfloat16",
                   "models": [{"model": str(f), **({"calibration": str(c)} if method == "esm" else {})}
                              for f, c in zip(fts, calib)]}
            if method == "task_arithmetic":
                cfg["parameters"] = {"weight": 1.0, "lambda": 0.3}
            path = args.work / f"floor-{method}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            rec = run_child(["merge", str(path), str(args.work / f"floor-out-{method}"), "--overwrite", "-q",
                             "--threads", str(args.threads)], args.work / "child.json", args.threads)
            runs[method].append(rec)
            print(f"run {rep} {method}: process {rec['process']:.1f} s, merge {rec['wall']:.1f} s, "
                  f"inside svd/eigh {rec['lapack']:.1f} s", flush=True)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("process", "wall", "lapack")}
           for m, rs in runs.items()}
    ta = med.get("task_arithmetic", {}).get("process")
    result = {"threads": args.threads, "repeats": args.repeats, "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "median": med, "runs": runs}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# The exact decompositions' share of each subspace merge ({args.threads} threads, "
             f"median of {args.repeats} interleaved runs)", "",
             "Written by `python benchmarks/subspace_floor.py` on the `esm_speed.py --layers 2` family (66M "
             "parameters, base + 4 fine-tunes, bf16). *process*: the child's wall time, Python start included (what "
             "`esm_speed.py` reports); *inside svd/eigh*: seconds inside `torch.linalg.svd` and `eigh`, a lower "
             "bound for any implementation that computes the same exact float64 decompositions.", "",
             "| merge | process (s) | inside svd/eigh (s) | process / TA | svd+eigh alone / TA |",
             "|---|---:|---:|---:|---:|"]
    for m, v in med.items():
        rel = f"{v['process'] / ta:.1f}x" if ta else ""
        floor = f"{v['lapack'] / ta:.1f}x" if ta else ""
        lines.append(f"| {m} | {v['process']:.1f} | {v['lapack']:.1f} | {rel} | {floor} |")
    lines += ["", "Calls of the last run, per decomposition and shape (count, seconds):", ""]
    for m, rs in runs.items():
        if rs[-1]["calls"]:
            parts = [f"{k}: {c} / {s:.1f} s" for k, (c, s) in sorted(rs[-1]["calls"].items(), key=lambda kv: -kv[1][1])]
            lines.append(f"- {m}: " + "; ".join(parts))
    (args.results / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
