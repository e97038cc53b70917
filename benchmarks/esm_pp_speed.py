"""Inference cost of ESM++ routing vs the static model (a benchmark line, not a test).

Times sentence embedding of 1,024 benchmark texts (batches of 128, length-sorted, as the benchmark
scores) with all-MiniLM-L6-v2: the static model, and the same model with T = 8 tasks' experts
attached (ranks 8 and 32; q/k/v + MLP-in, or all six linears; at r = 32 on q/k/v + MLP-in also with a linear
router, the Gaussian / trained routers' rule, in place of the cosine-to-prototype rule).  Expert values do not change the cost,
so they are random here; only shapes matter.  Median of 3 repeats after a warm-up.

    python benchmarks/esm_pp_speed.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from submerge.bench.backbone import Backbone
from submerge.bench.tasks import get_task
from submerge.routing import ExpertSet, LayerExperts, attach
from submerge.routing.experts import is_routed, routed_roles


def experts_for(model: torch.nn.Module, T: int, rank: int, routed: str, linear_router: bool = False,
                bias: bool = True) -> ExpertSet:
    from submerge.layers import parse_role_patterns

    roles, rules = routed_roles(routed), parse_role_patterns("")
    out = ExpertSet([f"t{i}" for i in range(T)], rank)
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if p.dim() == 2 and is_routed(name, roles, rules):
            d_out, d_in = p.shape
            out.layers[name[: -len(".weight")]] = LayerExperts(
                torch.randn(T, d_out, rank, generator=g) * 0.01, torch.randn(T, rank, d_in, generator=g) * 0.01,
                torch.randn(T, d_in, generator=g), torch.zeros(T, d_out) if bias else None)
            if linear_router:  # the Gaussian / trained routers' rule: pooled input . w_t + b_t
                layer = out.layers[name[: -len(".weight")]]
                layer.router_w, layer.router_b = torch.randn(T, d_in, generator=g), torch.randn(T, generator=g)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "esm_pp")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bb = Backbone()
    texts = get_task("rt_sentiment").split(seed=0).test[0][: args.n]
    base_params = sum(p.numel() for p in bb.model.parameters())

    def timed() -> float:
        bb.embed(texts[:128])  # warm-up
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            bb.embed(texts)
            runs.append(time.perf_counter() - t0)
        return 1000 * statistics.median(runs) / len(texts)

    rows = {"static": {"ms_per_example": timed(), "extra_params_pct": 0.0}}
    for routed in ("qkv,mlp_in", "all"):
        for rank in (8, 32):
            for linear in (False, True) if (routed, rank) == ("qkv,mlp_in", 32) else (False,):
                ex = experts_for(bb.model, 8, rank, routed, linear)
                router = attach(bb.model, ex)
                ms = timed()
                router.detach()
                rows[f"r{rank} {routed}" + (" + linear router" if linear else "")] = {
                    "ms_per_example": ms,
                    "extra_params_pct": 100 * (ex.n_params + ex.n_prototype_values) / base_params}
    static = rows["static"]["ms_per_example"]
    lines = [f"# ESM++ inference cost: all-MiniLM-L6-v2, {len(texts)} texts, batch 128, {args.threads} CPU threads, "
             "T = 8 experts", "", "| model | ms / example | × static | extra parameters (% of the model) |",
             "|---|---:|---:|---:|"]
    for k, v in rows.items():
        lines.append(f"| {k} | {v['ms_per_example']:.2f} | {v['ms_per_example'] / static:.2f} | "
                     f"{v['extra_params_pct']:.1f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(rows, indent=2))
    (args.out / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
