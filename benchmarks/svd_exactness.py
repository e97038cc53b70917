"""Exact vs randomized SVD inside TSV-M and Iso-CTS: how far the merged weights move, and what exactness costs
(a benchmark, not a test).

Until issue 11, TSV-M and Iso-CTS switched to ``torch.svd_lowrank`` (q = k + 16, 4 power iterations) for
matrices with min(m, n) >= 2048 whenever k <= min(m, n)/8 (T >= 8 tasks).  This script rebuilds that old path
beside the exact one (now the only one) on synthetic task vectors shaped like fine-tuning updates (a decaying
low-rank part + a noise floor), and writes the relative Frobenius difference of the merged updates and the
wall time of each, to benchmarks/results/svd_exactness.md and .json.

    python benchmarks/svd_exactness.py [--sizes 2048] [--tasks 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from submerge.methods.subspace import iso_cts_split, polar

HERE = Path(__file__).resolve().parent


def old_truncated_svd(x: torch.Tensor, k: int):
    """The removed switch, as it was: randomized for min(m, n) >= 2048 and 8k <= min(m, n)."""
    m, n = x.shape
    if min(m, n) >= 2048 and 8 * k <= min(m, n):
        u, s, v = torch.svd_lowrank(x.float(), q=min(k + 16, min(m, n)), niter=4)
        return u[:, :k].to(x.dtype), s[:k].to(x.dtype), v[:, :k].T.to(x.dtype)
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return u[:, :k].to(x.dtype), s[:k].to(x.dtype), vh[:k].to(x.dtype)


def exact_truncated_svd(x: torch.Tensor, k: int):
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return u[:, :k].to(x.dtype), s[:k].to(x.dtype), vh[:k].to(x.dtype)


def tsv(deltas, svd):
    k = min(deltas[0].shape) // len(deltas)
    us, ss, vs = zip(*(svd(d, k) for d in deltas))
    u_o, _ = polar(torch.cat(us, 1))
    vh_o, _ = polar(torch.cat(vs, 0))
    return (u_o * torch.cat(ss)) @ vh_o


def iso_cts(deltas, svd, fraction=0.8):
    total = sum(deltas)
    k_c, k_t = iso_cts_split(min(total.shape), len(deltas), fraction)
    u, s, vh = torch.linalg.svd(total.double(), full_matrices=False)
    u_c = u[:, :k_c].to(total.dtype)
    us, ss, vs = [u_c], [s[:k_c].to(total.dtype)], [vh[:k_c].to(total.dtype)]
    for d in deltas:
        ut, st, vht = svd(d - u_c @ (u_c.T @ d), k_t)
        us.append(ut)
        ss.append(st)
        vs.append(vht)
    u_o, _ = polar(torch.cat(us, 1))
    vh_o, _ = polar(torch.cat(vs, 0))
    return torch.cat(ss).mean() * (u_o @ vh_o)


def task_vectors(n: int, T: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(T):
        r = 64
        spectrum = torch.logspace(0, -2, r)
        a = torch.linalg.qr(torch.randn(n, r, generator=g))[0]
        b = torch.linalg.qr(torch.randn(n, r, generator=g))[0]
        out.append(((a * spectrum) @ b.T + 2e-3 * torch.randn(n, n, generator=g) / n ** 0.5).float())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2048")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "svd_exactness")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        deltas = task_vectors(n, args.tasks, seed=n)
        for name, rule in (("tsv", tsv), ("iso_cts", iso_cts)):
            res = {}
            for path, svd in (("randomized (removed)", old_truncated_svd), ("exact (now)", exact_truncated_svd)):
                t0 = time.perf_counter()
                res[path] = rule([d.clone() for d in deltas], svd)
                res[path + " s"] = time.perf_counter() - t0
            exact, rand = res["exact (now)"].double(), res["randomized (removed)"].double()
            rel = float(torch.linalg.norm(rand - exact) / torch.linalg.norm(exact))
            rows.append({"method": name, "size": n, "tasks": args.tasks, "rel_frobenius_diff": rel,
                         "seconds_exact": res["exact (now) s"], "seconds_randomized": res["randomized (removed) s"]})
            print(rows[-1], flush=True)
    meta = {"threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
            "python": platform.python_version()}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# Exact vs randomized SVD in TSV-M / Iso-CTS", "",
             f"Synthetic task vectors (rank-64 decaying spectrum + noise floor), {args.tasks} tasks, float32 inputs, "
             f"{args.threads} CPU threads, torch {torch.__version__}. Produced by `python benchmarks/svd_exactness.py`.",
             "", "| method | matrix | tasks | ‖randomized − exact‖ / ‖exact‖ | exact s | randomized s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['size']}×{r['size']} | {r['tasks']} | {100 * r['rel_frobenius_diff']:.1f}% "
                     f"| {r['seconds_exact']:.1f} | {r['seconds_randomized']:.1f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
