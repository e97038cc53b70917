"""What `submerge merge --backend ray` costs on one machine (issue 32): the same merges, local and on a local Ray
instance with two workers, interleaved, median of ``--repeats``.  A benchmark, not a test.

The family is ``benchmarks/esm_speed.py``'s (a 66M-parameter bf16 Llama, base + 4 fine-tunes, with calibration
statistics; built there, or here if missing).  The output is cut into shards of ``--shard-size`` so that Ray has
several tasks to spread (one shard would be one task).  Each run is its own process, started as a user starts it,
so the Ray rows include starting the instance (about what a user pays on one machine); the driver's peak RSS is
measured, the Ray workers' is not (they are not its children).

    python benchmarks/ray_merge_overhead.py [--threads 2] [--repeats 3] [--methods ties,tsv,esm]

Writes benchmarks/results/ray_merge_overhead.md and .json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from esm_speed import measure  # noqa: E402  (the same child-process timer: seconds, peak RSS in MB)


def family(work: Path) -> tuple[Path, list[Path], list[Path]]:
    """The esm_speed family (66M, 2 layers) and one calibration folder per fine-tune, built if missing."""
    fam = work / "family"
    base, fts = fam / "base", [fam / f"ft{i}" for i in range(4)]
    stats = [work / f"stats{i}" for i in range(4)]
    if not (fam / "ft3").exists() or not all(s.exists() for s in stats):
        subprocess.run([sys.executable, str(HERE / "esm_speed.py"), "--work", str(work), "--layers", "2",
                        "--methods", "task_arithmetic", "--name", "esm_speed_family_only",
                        "--results", str(work / "results")], check=True)
    return base, fts, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/submerge-esm-speed"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="ties,tsv,esm")
    ap.add_argument("--shard-size", default="40MB")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()
    base, fts, stats = family(args.work)
    exe = [shutil.which("submerge")] if shutil.which("submerge") else [sys.executable, "-m", "submerge.cli"]
    env = ["env", f"OMP_NUM_THREADS={args.threads}", f"MKL_NUM_THREADS={args.threads}"]
    runs: dict = {}
    for method in args.methods.split(","):
        cfg = {"merge_method": method, "base_model": str(base), "dtype": "bfloat16",
               "models": [{"model": str(f), **({"calibration": str(s)} if method in ("esm", "regmean") else {})}
                          for f, s in zip(fts, stats)]}
        if method == "ties":
            cfg["parameters"] = {"weight": 1.0, "density": 0.2, "lambda": 1.0}
        path = args.work / f"ray-{method}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        for r in range(args.repeats):  # interleaved: local, ray, local, ray, ...
            for backend in ("local", "ray"):
                out = args.work / f"out-{method}-{backend}"
                # local: one process with every thread; ray: each task one thread, as many tasks side by side
                threads = args.threads if backend == "local" else 1
                cmd = env + [*exe, "merge", str(path), str(out), "--overwrite", "-q", "--threads", str(threads),
                             "--out-shard-size", args.shard_size, "--backend", backend]
                dt, rss = measure(cmd)
                runs.setdefault(method, {}).setdefault(backend, []).append({"seconds": dt, "driver_peak_rss_mb": rss})
                print(f"{method} {backend} #{r + 1}: {dt:.1f} s, driver {rss:.0f} MB", flush=True)
        same = all((args.work / f"out-{method}-local" / f.name).read_bytes() == f.read_bytes()
                   for f in (args.work / f"out-{method}-ray").glob("*.safetensors"))
        runs[method]["identical_files"] = same
    out = {"threads": args.threads, "repeats": args.repeats, "shard_size": args.shard_size,
           "cpus": torch.get_num_threads(), "machine": platform.machine(), "python": platform.python_version(),
           "torch": torch.__version__, "runs": runs}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "ray_merge_overhead.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# `submerge merge --backend ray` on one machine: the cost of the extra processes", "",
             f"66M-parameter bf16 Llama, base + 4 fine-tunes (`benchmarks/esm_speed.py`'s family); {args.threads} "
             f"threads; output shards of {args.shard_size}; one process per run, interleaved, median of "
             f"{args.repeats} (min–max). Local: one process, {args.threads} threads. Ray: a new local instance per "
             f"run, start included, `--threads 1`: each task reserves one CPU and runs one thread, so {args.threads} "
             "tasks run side by side.", "",
             "| method | local | ray | ray − local | files identical |", "|---|---:|---:|---:|---|"]
    for method, r in runs.items():
        loc = [x["seconds"] for x in r["local"]]
        ray = [x["seconds"] for x in r["ray"]]
        lines.append(f"| {method} | {statistics.median(loc):.1f} s ({min(loc):.1f}–{max(loc):.1f}) "
                     f"| {statistics.median(ray):.1f} s ({min(ray):.1f}–{max(ray):.1f}) "
                     f"| {statistics.median(ray) - statistics.median(loc):+.1f} s | {r['identical_files']} |")
    (args.results / "ray_merge_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
