"""Inference cost of ESM++ on the LLM suite's decoder, timed on a quiet machine (a benchmark, not a test).

The LLM table's ESM++ rows carry a milliseconds-per-question column, but their static reference was scored while
that run was paused (so it is too slow), and with the shared-prefix shortcut a routed model cannot take (so the two
are not the same computation).  This script times the scoring path again, on its own: SmolLM2-135M-Instruct
scoring the suite's test questions (three demonstrations each, one teacher-forced pass per batch of ``eval_batch``
= 32, length-sorted, as the suite scores) with

- the static model, as the suite scores it: the demonstrations all of a skill's questions share run once and
  their keys and values are reused (``share_prefix``);
- the static model with every row run in full, as a routed model must run it (a router pools each row's whole
  prompt, demonstrations included, at every layer, so no two rows share a hidden state): the routed rows' fair
  reference, which isolates what the experts and the routing cost;
- T = 6 experts of rank r = 8 on q/k/v + MLP-in (the suite's ESM++ shape: 7.8% more parameters), routed per
  sequence from its prompt by the cosine-to-prototype rule;
- the same, every token routed on its own (causal) layer input;
- the same experts with a linear router (the Gaussian router's rule) in place of the cosine rule.

Expert values do not change the cost (every question runs one expert's low-rank correction on every routed
layer), so they are random here: only their shapes matter, and no expert has to be trained.  The variants are
interleaved and repeated; the table gives each one's median.  ``--n`` test questions per skill (the suite's seeded
split at that size), not the table's 150, to keep it short.

    python benchmarks/llm_esm_pp_speed.py [--threads 2] [--n 30] [--repeats 2]

Writes benchmarks/results/llm/esm_pp_speed.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import time
from pathlib import Path

import torch
from esm_pp_speed import experts_for  # this folder is the script's first import path

HERE = Path(__file__).resolve().parent


class _NoRouting:
    """What the suite's scoring asks of a router, doing nothing: given one, it runs every row in full."""

    @staticmethod
    def routing_mask(mask):
        return contextlib.nullcontext()


def main() -> None:
    from submerge.bench.llm.session import LLMBenchConfig, LLMSession

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=30, help="test questions per skill")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--routed", default="qkv,mlp_in")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "llm")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    S = LLMSession(LLMBenchConfig(seed=0, n_test=args.n, multitask=False))
    n_q = sum(S.test_size(t) for t in S.names)
    base_params = sum(p.numel() for p in S.cm.model.parameters())
    T = len(S.names)
    # the encoder benchmark's random experts, without bias residuals (Llama's linears have none)
    cosine = experts_for(S.cm.model, T, args.rank, args.routed, False, bias=False)
    linear = experts_for(S.cm.model, T, args.rank, args.routed, True, bias=False)

    def unshared():
        with S.loaded(S.base):
            return S.score_each("test", lambda i: contextlib.nullcontext(), router=_NoRouting())

    variants = {
        "static (shared prefix)": lambda: S.evaluate(S.base, "test"),
        "static, every row in full": unshared,
        "routed per sequence (cosine)": lambda: S.evaluate_routed(S.base, cosine, "test", "route"),
        "routed per token (cosine)": lambda: S.evaluate_routed(S.base, cosine, "test", "route", per_token=True),
        "routed per sequence (linear router)": lambda: S.evaluate_routed(S.base, linear, "test", "route"),
    }
    S.evaluate(S.base, "test")  # warm-up: tokenises and encodes every question once
    times: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            print(f"repeat {rep + 1}: {name}: {1000 * times[name][-1] / n_q:.1f} ms/question", flush=True)

    static = statistics.median(times["static (shared prefix)"])
    full = statistics.median(times["static, every row in full"])
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {"ms_per_question": 1000 * med / n_q, "x_static": med / static, "x_static_full": med / full,
                      "seconds": ts, "extra_params_pct": 0.0 if name.startswith("static") else
                      100 * (cosine.n_params + cosine.n_prototype_values) / base_params}
    out = {"backbone": S.cm.name, "threads": torch.get_num_threads(), "questions": n_q,
           "questions_per_skill": args.n, "tasks": S.names, "experts": T, "rank": args.rank, "routed": args.routed,
           "eval_batch": S.cfg.eval_batch, "repeats": args.repeats,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "rows": rows}
    lines = [f"# ESM++ inference cost on the LLM suite: {S.cm.name}", "",
             f"{n_q} test questions ({args.n} per skill, three demonstrations each), scored as the suite scores "
             f"(one teacher-forced pass per batch: at most {S.cfg.eval_batch} questions of one skill); "
             f"{out['threads']} CPU threads; T = {T} experts of rank {args.rank} on {args.routed}; "
             f"median of {args.repeats} interleaved repeats; peak RSS "
             f"{out['peak_rss_gb']:.2f} GB. Written by `benchmarks/llm_esm_pp_speed.py`.", "",
             "| model | ms / question | × static (shared prefix) | × static (every row in full) | "
             "extra parameters (% of the model) | seconds per repeat |", "|---|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['ms_per_question']:.1f} | {r['x_static']:.2f} | {r['x_static_full']:.2f} | "
                     f"{r['extra_params_pct']:.1f} | "
                     + ", ".join(f"{s:.1f}" for s in r["seconds"]) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "esm_pp_speed.json").write_text(json.dumps(out, indent=1) + "\n")
    (args.out / "esm_pp_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
