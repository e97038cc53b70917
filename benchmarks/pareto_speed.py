"""What a 21-point Pareto sweep costs against fine-tuning (a benchmark line, not a test).

Same setting as ``submerge pareto --tasks rt_sentiment,rt_subjectivity`` (cached experts of seeds 0
and 1, sampled Fisher on 64 train inputs per expert): times the 21 merges of each rule alone, one
evaluation of a merged model (test 2 x 1,000 texts, and val 2 x 300), and reads the fine-tuning times
from the expert cache logs and ``results/pareto/.../pareto.json``.

    python benchmarks/pareto_speed.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from submerge.api import merge_state_dicts
from submerge.bench.pareto import _extra_seed_experts, _scores, simplex_grid
from submerge.bench.session import BenchConfig, BenchSession

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--front", type=Path,
                    default=HERE / "results" / "pareto" / "rt_sentiment-rt_subjectivity-seed0" / "pareto.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    S = BenchSession(BenchConfig(tasks=["rt_sentiment", "rt_subjectivity"], quiet=True))
    t0 = time.perf_counter()
    F = S.fisher()
    fisher_s = time.perf_counter() - t0
    extra = _extra_seed_experts(S, 1)
    F2 = S.fisher(experts=extra)
    points = simplex_grid(2, 21)
    rows = {"fisher_seconds_per_expert": fisher_s / 2}
    for rule in ("isotropic", "diagonal", "mixture"):
        t0 = time.perf_counter()
        for w in points:
            if rule == "mixture":
                merge_state_dicts("posterior", S.base, S.experts + extra, {"family": "mixture"},
                                  [{"weight": w[i % 2], "task": S.names[i % 2]} for i in range(4)], stats=F + F2)
            elif rule == "diagonal":
                merge_state_dicts("posterior", S.base, S.experts, {"family": "diagonal"},
                                  [{"weight": x} for x in w], stats=F)
            else:
                merge_state_dicts("posterior", S.base, S.experts, {"family": "isotropic", "prior_precision": 1.0},
                                  [{"weight": x} for x in w])
        rows[f"{rule}_21_merges_seconds"] = time.perf_counter() - t0
    state = merge_state_dicts("posterior", S.base, S.experts, {"family": "diagonal"}, [{"weight": 0.5}] * 2, stats=F)
    for split in ("test", "val"):
        t0 = time.perf_counter()
        _scores(S, state, split)
        rows[f"one_eval_{split}_seconds"] = time.perf_counter() - t0
    rows["expert_finetune_seconds"] = [S.ft_logs[n].get("seconds") for n in S.names]
    if args.front.exists():
        rows["multitask_finetune_seconds"] = [g["seconds"] for g in json.loads(args.front.read_text())["multitask"]]
    out = HERE / "results" / "pareto" / "speed.json"
    out.write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
