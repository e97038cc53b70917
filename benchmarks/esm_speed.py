"""Cost of the data-based path on a ~200M-parameter Llama family (a benchmark, not a test).

Builds a synthetic Llama-architecture family (random base + 4 "fine-tunes" = base + low-rank update +
noise, bf16, ~201M parameters each), then measures on this machine:

* ``submerge calibrate`` per fine-tune: 32 inputs x 128 tokens (random token ids from a .pt file);
* ``submerge merge`` with task_arithmetic, tsv, iso_cts, esm (vit recipe) and regmean on the same models;

each as a separate process: wall time and peak RSS (getrusage of the child).  Writes
benchmarks/results/esm_speed.md and .json.

    python benchmarks/esm_speed.py [--work DIR] [--layers 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from merge_speed import _MEASURE  # noqa: E402  (same child-process timer)


def measure(cmd: list[str]) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    dt, rss = out.stdout.split()[:2]  # the timer also prints CPU seconds
    return float(dt), int(rss) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/submerge-esm-speed"))
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="task_arithmetic,tsv,iso_cts,esm,regmean")
    ap.add_argument("--device", default="cpu", help="where calibration and merge math run (cpu, cuda)")
    ap.add_argument("--name", default="esm_speed", help="results file stem under benchmarks/results/")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()
    from submerge.synthetic import llama_config, make_family

    fam = args.work / "family"
    if not (fam / "ft3").exists():
        shutil.rmtree(fam, ignore_errors=True)
        cfg = llama_config(hidden=1024, layers=args.layers, heads=16, inter=4096, vocab=16000)
        make_family(fam, config=cfg, n_finetunes=4, rank=16, update_scale=0.05, noise=2e-4,
                    dtype=torch.bfloat16, seed=0, max_shard_size="2GB")
    base, fts = fam / "base", [fam / f"ft{i}" for i in range(4)]
    n_params = sum(t.numel() for f in base.glob("*.safetensors")
                   for t in __import__("safetensors.torch", fromlist=["load_file"]).load_file(f).values())
    env_threads = ["env", f"OMP_NUM_THREADS={args.threads}", f"MKL_NUM_THREADS={args.threads}"]
    exe = [shutil.which("submerge")] if shutil.which("submerge") else [sys.executable, "-m", "submerge.cli"]
    results: dict = {"params": n_params, "threads": args.threads, "layers": args.layers, "calibrate": {}, "merge": {},
                     "python": platform.python_version(), "torch": torch.__version__}
    calib = []
    for i, ft in enumerate(fts):
        inputs = args.work / f"inputs{i}.pt"
        g = torch.Generator().manual_seed(i)
        torch.save({"input_ids": torch.randint(0, 16000, (32, 128), generator=g),
                    "attention_mask": torch.ones(32, 128, dtype=torch.long)}, inputs)
        out = args.work / f"stats{i}"
        shutil.rmtree(out, ignore_errors=True)
        dt, rss = measure(env_threads + [*exe, "calibrate", str(ft), str(inputs), str(out), "-n", "32", "-q",
                                         "--device", args.device])
        results["calibrate"][f"ft{i}"] = {"seconds": dt, "peak_rss_mb": rss}
        print(f"calibrate ft{i}: {dt:.1f}s, {rss:.0f} MB", flush=True)
        calib.append(out)
    for method in args.methods.split(","):
        cfg = {"merge_method": method, "base_model": str(base), "dtype": "bfloat16",
               "models": [{"model": str(f), **({"calibration": str(c)} if method in ("esm", "esm_pp", "regmean") else {})}
                          for f, c in zip(fts, calib)]}
        if method == "task_arithmetic":
            cfg["parameters"] = {"weight": 1.0, "lambda": 0.3}
        path = args.work / f"{method}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        out = args.work / f"out-{method}"
        dt, rss = measure(env_threads + [*exe, "merge", str(path), str(out), "--overwrite", "-q",
                                         "--threads", str(args.threads), "--device", args.device])
        results["merge"][method] = {"seconds": dt, "peak_rss_mb": rss}
        print(f"merge {method}: {dt:.1f}s, {rss:.0f} MB", flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    results["device"] = args.device if args.device == "cpu" else torch.cuda.get_device_name(0)
    (args.results / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    ta = results["merge"].get("task_arithmetic", {}).get("seconds")
    lines = [f"# Data-based merging cost: {n_params / 1e6:.0f}M-parameter Llama family, base + 4 fine-tunes (bf16)",
             "", f"{args.threads} CPU threads, {platform.processor() or platform.machine()}, math on {results['device']}; "
             "one process per row; "
             "32 calibration inputs x 128 tokens per task.", "",
             "| step | seconds | peak RSS (MB) | vs task_arithmetic |", "|---|---|---|---|"]
    for k, v in results["calibrate"].items():
        lines.append(f"| calibrate {k} | {v['seconds']:.1f} | {v['peak_rss_mb']:.0f} | |")
    for k, v in results["merge"].items():
        rel = f"{v['seconds'] / ta:.1f}x" if ta else ""
        lines.append(f"| merge {k} | {v['seconds']:.1f} | {v['peak_rss_mb']:.0f} | {rel} |")
    (args.results / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
