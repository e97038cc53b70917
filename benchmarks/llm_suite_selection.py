"""How the LLM suite's skills and sizes were chosen: validation only, by the rule in benchmarks/results/llm/README.md
(written before any test number was computed).  A benchmark, not a test.

For every candidate skill: the base model's val exact match, its LoRA expert's (the suite's recipe), and then, on
the skills that pass, task arithmetic's val-tuned normalised val score (interference).  Nothing here touches a test
split.  Writes benchmarks/results/llm/selection_run<N>.json (``--out``; and prints a table).

    python benchmarks/llm_suite_selection.py [--n-train 800] [--steps 60] [--turns all] [--shots 3] [--threads 2]

Run 2 was ``--steps 40 --turns last --micro-batch 0 --tasks translate_de,...`` (the recipe of runs 1-2).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from submerge.bench.llm.finetune import LLMRecipe
from submerge.bench.llm.session import LLM_CANDIDATES, LLMBenchConfig, LLMSession
from submerge.search import search_alpha

HERE = Path(__file__).resolve().parent
MIN_BASE = 0.02   # (1) the base answers some of the skill's questions exactly: measurable, not a floor of zeros
MIN_GAIN = 0.15   # (2) the expert gains at least 15 points of exact match on its own skill
MAX_TA_NORM = 0.93  # (3) val-tuned task arithmetic at most 93% normalised on the kept skills: interference shows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=800)
    ap.add_argument("--n-val", type=int, default=50)
    ap.add_argument("--steps", type=int, default=LLMRecipe.steps)
    ap.add_argument("--turns", choices=["last", "all"], default=LLMRecipe.turns)
    ap.add_argument("--micro-batch", type=int, default=LLMRecipe.micro_batch, help="0: one pass per batch")
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--lr", type=float, default=LLMRecipe.lr)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tasks", default=",".join(LLM_CANDIDATES))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "llm" / "selection_run3.json")
    ap.add_argument("--note", default="", help="why candidates left out of --tasks were not run (kept in the file)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cfg = LLMBenchConfig(tasks=args.tasks.split(","), n_train=args.n_train, n_val=args.n_val, n_test=150, shots=args.shots,
                         recipe=LLMRecipe(steps=args.steps, lr=args.lr, turns=args.turns,
                                                        micro_batch=args.micro_batch or None), multitask=False)
    S = LLMSession(cfg)
    per = {}
    for t in S.names:
        base, expert = float(S.zs_val[t].mean()), float(S.ft_val[t].mean())
        per[t] = {"base_val": base, "expert_val": expert, "gain": expert - base,
                  "base_nll_val": float(S.zs_val.nll[t].mean()), "expert_nll_val": float(S.ft_val.nll[t].mean()),
                  "train_log": S.ft_logs[t], "rule_base": base >= MIN_BASE, "rule_gain": expert - base >= MIN_GAIN}
        print(f"{t:20s} base {base:.3f}  expert {expert:.3f}  gain {expert - base:+.3f}  "
              f"{'keep' if per[t]['rule_base'] and per[t]['rule_gain'] else 'drop'}", flush=True)
    kept = [t for t in S.names if per[t]["rule_base"] and per[t]["rule_gain"]]
    out = {"rule": {"min_base_val": MIN_BASE, "min_gain_val": MIN_GAIN, "max_task_arithmetic_norm_val": MAX_TA_NORM},
           "config": {"n_train": args.n_train, "n_val": args.n_val, "steps": args.steps, "lr": args.lr, "shots": args.shots,
                      "turns": args.turns, "micro_batch": args.micro_batch or None,
                      "threads": torch.get_num_threads()},
           "candidates": per, "kept": kept,
           "not_run": [c for c in LLM_CANDIDATES if c not in S.names], "note": args.note}
    if len(kept) >= 2:
        idx = [S.names.index(t) for t in kept]
        sub_experts = [S.experts[i] for i in idx]
        ft_mean = {t: S.ft_val_mean[t] for t in kept}

        def val_norm(state):
            res = {t: S.task_correct(state, S.names.index(t), "val") for t in kept}
            return sum(res[t].mean() / ft_mean[t] for t in kept) / len(kept)

        found = search_alpha("task_arithmetic", S.base, sub_experts, val_norm, {"weight": 1.0}, random_seed=0,
                             grid=list(cfg.lambda_grid), patience=None)
        out["task_arithmetic_val"] = {"lambda": found.alpha, "norm": found.curve[found.alpha],
                                      "curve": {str(k): v for k, v in sorted(found.curve.items())},
                                      "rule_interference": found.curve[found.alpha] <= MAX_TA_NORM}
        print(f"task arithmetic on {len(kept)} kept skills: lambda {found.alpha}, val norm "
              f"{found.curve[found.alpha]:.3f}", flush=True)
    out["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out} in {out['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
