"""The written plan for TSV-M and ESM of 8 fine-tunes of a 70B Llama on 8 GPU nodes (issue 32): a cost model, not a
run.  A benchmark script, not a test.

What it does: counts, per weight matrix of Llama-3-70B's shapes, the float64 floating-point work of submerge's exact
TSV-M and ESM (``essential_tsv`` recipe) kernels, the bytes read and written, and the memory one worker needs for
the largest tensor group.  Wall times come from *measured* rates: the same flop count for the families
``benchmarks/esm_speed.py`` timed (66M on 2 CPU threads, ``esm_speed.json``; 201M on an H200,
``esm_speed_gpu.json``) divided by their measured merge time over task arithmetic's.  Those rates come from
1024-wide matrices.  A GPU's SVD is far better used at 8192 wide, so the GPU times below are upper bounds until
``--measure`` runs on a lent GPU.  ``--measure`` times one exact float64 SVD of each 70B shape on this device.

    python benchmarks/plan_70b.py [--tasks 8] [--nodes 8] [--gpus-per-node 8] [--measure] [--device cuda]

Writes benchmarks/results/plan_70b.md and .json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Llama:
    """The shapes of a Llama decoder (no weights): enough for the cost of every per-matrix kernel."""

    name: str
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    def matrices(self) -> list[tuple[str, int, int, int]]:
        """(role, d_out, d_in, count) per weight-matrix kind, embeddings included."""
        head = self.hidden // self.heads
        kv = self.kv_heads * head
        out = [("q", self.hidden, self.hidden, self.layers), ("k", kv, self.hidden, self.layers),
               ("v", kv, self.hidden, self.layers), ("attn_out", self.hidden, self.hidden, self.layers),
               ("mlp_gate", self.inter, self.hidden, self.layers), ("mlp_up", self.inter, self.hidden, self.layers),
               ("mlp_down", self.hidden, self.inter, self.layers), ("embed", self.vocab, self.hidden, 1)]
        if not self.tied:
            out.append(("lm_head", self.vocab, self.hidden, 1))
        return out

    def layer_matrices(self) -> list[tuple[str, int, int, int]]:
        """The block stack's matrices: what the subspace kernels merge (embeddings take the mean of the task
        vectors, TSV-M's and ESM's default ``embeddings: mean``)."""
        return [m for m in self.matrices() if m[0] not in ("embed", "lm_head")]

    def params(self) -> int:
        return sum(o * i * c for _, o, i, c in self.matrices()) + (2 * self.layers + 1) * self.hidden


# Llama-3-70B's config.json (meta-llama/Meta-Llama-3-70B): hidden 8192, intermediate 28672, 80 layers, 64 heads,
# 8 key/value heads, vocabulary 128256, untied embeddings.
LLAMA3_70B = Llama("Llama-3-70B", 8192, 28672, 80, 64, 8, 128256)
# The synthetic families benchmarks/esm_speed.py times (llama_config: no GQA, untied, vocabulary 16000)
FAMILY_66M = Llama("66M family", 1024, 4096, 2, 16, 16, 16000)
FAMILY_201M = Llama("201M family", 1024, 4096, 10, 16, 16, 16000)


def svd_flops(m: int, n: int) -> float:
    """A thin SVD with both factors of an m x n matrix (Golub & Van Loan's R-SVD count: 4mn² + 22n³ for
    m >= n)."""
    m, n = max(m, n), min(m, n)
    return 4.0 * m * n * n + 22.0 * n ** 3


def eigh_flops(n: int) -> float:
    """A symmetric eigendecomposition with vectors (about 9n³)."""
    return 9.0 * n ** 3


def tsv_flops(d_out: int, d_in: int, T: int) -> float:
    """TSV-M on one matrix (``subspace.tsv_merge``): T exact SVDs of ΔW_t, the polar factors of the stacked U
    (d_out x T·k) and V (T·k x d_in), k = min/T, and U_o diag(S) V_o."""
    n = min(d_out, d_in)
    k = n // T
    return T * svd_flops(d_out, d_in) + svd_flops(d_out, T * k) + svd_flops(T * k, d_in) + 2.0 * d_out * T * k * d_in


def esm_flops(d_out: int, d_in: int, T: int) -> float:
    """ESM's ``essential_tsv`` recipe on one matrix (``esm.esm_merge_matrix`` with fusion tsv): per task the
    essential subspace from the input Gram (``stats.gram.essential_subspace``), C = EᵀΔW, an SVD of the rank-r
    factor, then TSV-M's fusion of the T essential approximations."""
    r = max(1, d_out // T)
    if d_out <= d_in:
        sub = 2.0 * d_out * d_in * d_in + 2.0 * d_out * d_out * d_in + eigh_flops(d_out)
    else:
        sub = (eigh_flops(d_in) + 2.0 * d_in ** 3 + 4.0 * d_out * d_in * d_in + eigh_flops(d_in)
               + 2.0 * d_out * d_in * min(r, d_in))
    per_task = sub + 2.0 * r * d_out * d_in + svd_flops(r, d_in) + 2.0 * d_out * r * r
    return T * per_task + svd_flops(d_out, T * r) + svd_flops(T * min(r, d_in), d_in) + 2.0 * d_out * T * r * d_in


def model_flops(model: Llama, T: int, method: str) -> float:
    """The float64 work of ``method``'s kernel over ``model``'s block-stack matrices."""
    kernel = {"tsv": tsv_flops, "esm": esm_flops}[method]
    return sum(c * kernel(o, i, T) for _, o, i, c in model.layer_matrices())


def group_memory_gb(d_out: int, d_in: int, T: int, method: str) -> float:
    """Device memory for one tensor group at its peak (float64): the T task vectors, the batched SVD's U
    (T x d_out x min) and Vᵀ (T x min x d_in), the stacked factors and their polar factors; ESM adds the T input
    Grams (d_in²)."""
    n = min(d_out, d_in)
    words = T * d_out * d_in + T * (d_out * n + n * d_in) + 2 * (d_out * n + n * d_in)
    if method == "esm":
        words += T * d_in * d_in + 2 * max(d_in, d_out) ** 2
    return 8 * words / 1e9


def measured_rates(results: Path) -> dict:
    """Effective float64 rates (flop/s) of the two measured runs: modelled work over (method - task arithmetic)
    seconds."""
    out = {}
    for fname, fam, where in (("esm_speed.json", FAMILY_66M, "cpu_2_threads"),
                              ("esm_speed_gpu.json", FAMILY_201M, "h200")):
        path = results / fname
        if not path.is_file():
            continue
        d = json.loads(path.read_text())
        ta = d["merge"]["task_arithmetic"]["seconds"]
        for method in ("tsv", "esm"):
            if method in d["merge"]:
                extra = d["merge"][method]["seconds"] - ta
                out[f"{where}/{method}"] = {"family": fam.name, "params": d["params"], "seconds": d["merge"][method]["seconds"],
                                            "task_arithmetic_seconds": ta,
                                            "flops": model_flops(fam, 4, method),
                                            "rate": model_flops(fam, 4, method) / extra}
    return out


def measure_svds(model: Llama, device: str) -> dict:
    """Seconds of one exact float64 SVD (``torch.linalg.svd``, thin) per distinct matrix shape of ``model``."""
    import torch

    out = {}
    for _, o, i, _ in model.layer_matrices():
        if f"{o}x{i}" in out:
            continue
        x = torch.randn(o, i, dtype=torch.float64, device=device)
        torch.linalg.svd(x[:64, :64], full_matrices=False)  # warm the solver
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.linalg.svd(x, full_matrices=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        out[f"{o}x{i}"] = {"seconds": dt, "flops": svd_flops(o, i), "rate": svd_flops(o, i) / dt}
        del x
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--read-gbps", type=float, default=2.0, help="GB/s one node reads from shared storage")
    ap.add_argument("--shard-gb", type=float, default=1.0, help="--out-shard-size of the planned merge")
    ap.add_argument("--measure", action="store_true", help="time one float64 SVD per 70B shape on --device")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()
    M, T = LLAMA3_70B, args.tasks
    P = M.params()
    bf16 = 2
    model_gb = P * bf16 / 1e9
    read_gb, write_gb = (T + 1) * model_gb, model_gb
    shards = math.ceil(model_gb / args.shard_gb)
    workers = args.nodes * args.gpus_per_node
    rates = measured_rates(args.results)
    out = {"model": M.name, "params": P, "tasks": T, "nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
           "bytes": {"model_gb_bf16": model_gb, "read_gb": read_gb, "written_gb": write_gb,
                     "read_gb_per_node": read_gb / args.nodes},
           "shards": shards, "measured_rates": rates, "methods": {}}
    largest = max(M.layer_matrices(), key=lambda m: m[1] * m[2])
    out["largest_group_inputs_gb_bf16"] = (T + 1) * largest[1] * largest[2] * bf16 / 1e9
    out["largest_group_tsv_flops"] = tsv_flops(largest[1], largest[2], T)
    out["matrix_merges"] = sum(c for *_, c in M.layer_matrices())
    for method in ("tsv", "esm"):
        flops = model_flops(M, T, method)
        per = {"flops": flops, "largest_group": f"{largest[0]} {largest[1]}x{largest[2]}",
               "group_memory_gb": group_memory_gb(largest[1], largest[2], T, method), "times": {}}
        for key, r in rates.items():
            if key.endswith("/" + method):
                where = key.split("/")[0]
                one = flops / r["rate"]
                per["times"][where] = {"one_worker_s": one, "rate_flops": r["rate"]}
        out["methods"][method] = per
    io_s = read_gb / args.nodes / args.read_gbps
    out["io_seconds_per_node"] = io_s
    if args.measure:
        out["measured_svds"] = {"device": args.device, "svds": measure_svds(M, args.device)}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "plan_70b.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.results / "plan_70b.md").write_text(markdown(out, workers, args))
    print((args.results / "plan_70b.md").read_text())


def _h(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def markdown(out: dict, workers: int, args) -> str:
    T = out["tasks"]
    b = out["bytes"]
    lines = [f"# Plan: TSV-M and ESM of {T} fine-tunes of {out['model']} on {out['nodes']} GPU nodes", "",
             "A cost model (`benchmarks/plan_70b.py`), not a run: flop counts of submerge's exact float64 kernels on "
             "Llama-3-70B's shapes, divided by rates measured on this project's own runs (`esm_speed.json`, "
             "`esm_speed_gpu.json`). Those rates come from 1024-wide matrices, where a GPU's SVD is poorly used, so "
             "the GPU times are upper bounds. `--measure` on a lent GPU replaces them.", "",
             f"- Model: {out['params'] / 1e9:.2f}B parameters, {b['model_gb_bf16']:.0f} GB in bf16; "
             f"{T} fine-tunes and the base are read once: {b['read_gb']:.0f} GB, {b['read_gb_per_node']:.0f} GB per node, "
             f"about {_h(out['io_seconds_per_node'])} per node at {args.read_gbps:g} GB/s.",
             f"- Output: {b['written_gb']:.0f} GB in {out['shards']} shards of {args.shard_gb:g} GB "
             f"(`--out-shard-size {args.shard_gb:g}GB`), one Ray task each, over {workers} GPU workers; each worker "
             "writes its own shard. Nothing but the shard list, ESM's per-layer norms and the task results goes "
             "through the driver.", "",
             "| method | float64 work | largest tensor group | its device memory | one worker, H200 rate (upper bound) "
             f"| {workers} workers | one worker, 2 CPU threads |", "|---|---:|---|---:|---:|---:|---:|"]
    for method, per in out["methods"].items():
        g = per["times"].get("h200", {}).get("one_worker_s")
        c = per["times"].get("cpu_2_threads", {}).get("one_worker_s")
        lines.append(f"| {method} | {per['flops'] / 1e15:.1f} PFLOP | {per['largest_group']} | {per['group_memory_gb']:.0f} GB "
                     f"| {_h(g) if g else '–'} | {_h(g / workers + out['io_seconds_per_node']) if g else '–'} "
                     f"| {_h(c) if c else '–'} |")
    tsv = out["methods"]["tsv"]["times"].get("h200", {}).get("one_worker_s")
    lines += ["", "What runs where:", "",
              "- **Driver** (any node, no GPU needed): plans the merge from the configs' headers, cuts the output into "
              "shards, submits one task per shard, then writes the index, config, tokenizer and model card and "
              "renames the folder into place. It reads no tensor data.",
              f"- **Workers** (one per GPU): each task reads its shard's tensors from the {T + 1} models on shared "
              "storage (host memory: the largest group's inputs in bf16, "
              f"{out['largest_group_inputs_gb_bf16']:.1f} GB), computes in float64 on its GPU (the device memory above), "
              "and writes its shard. Ray reruns a task whose worker dies.",
              f"- **Load balance**: {out['matrix_merges']} matrix merges over the workers; the critical path is "
              "one worker's share, as the table assumes: no matrix is split across workers."
              + (f" The largest matrix takes about {_h(out['largest_group_tsv_flops'] / out['methods']['tsv']['times']['h200']['rate_flops'])} "
                 "of TSV-M at the H200 rate." if tsv else ""),
              "- **ESM**: its whole-model pass (the essential subspaces and their fusion) runs as Ray tasks over runs of "
              "whole layers; each spills its unscaled results to the output's temporary folder on shared storage and "
              "returns one norm per matrix (a few KB). The driver joins the norms into the per-family layer scales, "
              "and the shard tasks read the spilled results and rescale them. That costs one more write and read "
              f"of the merged model in float32 ({2 * out['bytes']['model_gb_bf16']:.0f} GB each way) beside the table's "
              "compute.", ""]
    lines += ["Measured rates behind the times (modelled work / (method − task arithmetic) seconds):", "",
              "| run | family | method | seconds | task arithmetic | effective rate |", "|---|---|---|---:|---:|---:|"]
    for key, r in out["measured_rates"].items():
        where, method = key.split("/")
        lines.append(f"| {where} | {r['family']} | {method} | {r['seconds']:.1f} | {r['task_arithmetic_seconds']:.1f} "
                     f"| {r['rate'] / 1e9:.1f} GFLOP/s |")
    if "measured_svds" in out:
        lines += ["", f"One float64 SVD per 70B shape on `{out['measured_svds']['device']}`:", "",
                  "| shape | seconds | rate |", "|---|---:|---:|"]
        for shape, r in out["measured_svds"]["svds"].items():
            lines.append(f"| {shape} | {r['seconds']:.1f} | {r['rate'] / 1e9:.0f} GFLOP/s |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
