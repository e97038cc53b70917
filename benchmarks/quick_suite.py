"""How the `--quick` suite was chosen: validation numbers only, no test example is scored.

Each candidate (tasks, training examples, learning rate) gets its experts fine-tuned (cached like every bench
expert), then task arithmetic's scale is searched on the validation split (λ = 0.1 .. 1.0) and its best mean
normalised *validation* accuracy is recorded, with what the candidate costs (fine-tuning seconds, tokens per
evaluated example).  The rule, fixed before any candidate ran: among candidates whose experts all learn their task
(each expert ≥ 5 points above zero-shot on val) and whose val-tuned task arithmetic is at most 93% normalised on
val (a margin under the issue's 95% bound on test), take the cheapest (fine-tuning seconds + ~30 val and ~20
test evaluations).

    python benchmarks/quick_suite.py            # writes benchmarks/results/quick_suite/{results.json,README.md}
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from submerge.bench.finetune import Recipe
from submerge.bench.session import BenchConfig, BenchSession
from submerge.bench.tasks import SUITES
from submerge.search import search_alpha

# text8 without rt_sentiment, whose expert learns least from a few hundred examples
SEVEN = [t for t in SUITES["text8"] if t != "rt_sentiment"]
CANDIDATES = [
    # the quick suite before this change: same tasks, 1000 training examples, the default recipe
    {"tasks": ["rt_sentiment", "debate_party", "wordnet_noun", "wordnet_verb"], "n_train": 1000, "lr": 1e-4},
    {"tasks": ["rt_sentiment", "debate_party", "wordnet_noun", "wordnet_verb"], "n_train": 500, "lr": 3e-4},
    # tasks on shared inputs (noun glosses labelled two ways) and short texts, cheap to score
    {"tasks": ["debate_party", "wordnet_noun", "wordnet_verb", "wordnet_abstract"], "n_train": 500, "lr": 1e-4},
    {"tasks": ["debate_party", "wordnet_noun", "wordnet_verb", "wordnet_abstract"], "n_train": 500, "lr": 3e-4},
    {"tasks": ["rt_sentiment", "debate_party", "wordnet_noun", "wordnet_abstract"], "n_train": 500, "lr": 3e-4},
]
# Round 2, added when no 4-task candidate met the rule: more tasks (interference grows with their number), smaller
# splits per task to keep the cost of an evaluation; same rule.
CANDIDATES += [
    {"tasks": SEVEN, "n_train": 300, "lr": 1e-4, "n_val": 50, "n_test": 150, "round": 2},
    {"tasks": SEVEN, "n_train": 300, "lr": 3e-4, "n_val": 50, "n_test": 150, "round": 2},
    {"tasks": SUITES["text8"], "n_train": 500, "lr": 1e-4, "n_val": 50, "n_test": 150, "round": 2},
]
# Round 3, added when round 2 showed the few-hundred-example experts barely learn (merges score above them on
# val): fewer steps cannot make strong experts, so more training examples on short-text tasks; same rule.
SHORT4 = ["debate_party", "wordnet_noun", "wordnet_verb", "wordnet_abstract"]
CANDIDATES += [
    {"tasks": SHORT4, "n_train": 2000, "lr": 1e-4, "round": 3},
    {"tasks": ["rt_subjectivity", *SHORT4, "fortune_langid"], "n_train": 1000, "lr": 1e-4, "n_val": 60,
     "n_test": 150, "round": 3},
]
# Round 4: the same cheap 4-task suite, experts pushed further from the base by a larger learning rate (interference
# needs task vectors that are large and overlap); same rule.
CANDIDATES += [
    {"tasks": SHORT4, "n_train": 500, "lr": 1e-3, "round": 4},
    {"tasks": SHORT4, "n_train": 500, "lr": 3e-3, "round": 4},
]
# Round 5, added when fine-tuning was timed on a quiet machine (2026-11-29): a text8 expert (2,000 examples,
# 63 steps) fine-tunes in ~40 s, so 8 experts take ~5 min, not the >10 min measured while other work shared the
# cores (rounds 1-4).  text8's tasks at 1,000 and 2,000 training examples with small evaluation splits; same rule.
CANDIDATES += [
    {"tasks": SUITES["text8"], "n_train": 1000, "lr": 1e-4, "n_val": 50, "n_test": 150, "round": 5},
    {"tasks": SUITES["text8"], "n_train": 1000, "lr": 3e-4, "n_val": 50, "n_test": 150, "round": 5},
    {"tasks": SUITES["text8"], "n_train": 2000, "lr": 1e-4, "n_val": 50, "n_test": 150, "round": 5},
]
# Round 6, added when the chosen suite's full quick run, timed from scratch on a quiet machine after the run's own
# waste was cut (2026-11-29), took 9 min 47 s — under the 10-minute target by less than machine-to-machine noise:
# the size between round 5's 1,000 (fails the rule) and 2,000 (meets it); same rule.
CANDIDATES += [
    {"tasks": SUITES["text8"], "n_train": 1500, "lr": 1e-4, "n_val": 50, "n_test": 150, "round": 6},
]
N_VAL, N_TEST = 100, 250
GRID = [round(0.1 * i, 2) for i in range(1, 11)]


def run_candidate(c: dict) -> dict:
    t0 = time.perf_counter()
    cfg = BenchConfig(tasks=c["tasks"], n_train=c["n_train"], n_val=c.get("n_val", N_VAL), n_test=c.get("n_test", N_TEST),
                      recipe=Recipe(lr=c["lr"]), quiet=True)
    S = BenchSession(cfg)
    ft_seconds = sum(info["seconds"] for info in S.ft_logs.values())
    zs = {k: float(v.mean()) for k, v in S.zs_val.items()}
    ft = {k: float(v.mean()) for k, v in S.ft_val.items()}
    found = search_alpha("task_arithmetic", S.base, S.experts, S.val_score, {"weight": 1.0}, grid=GRID, patience=None)
    t_eval = time.perf_counter()
    S.val_score(found.state)
    eval_seconds = time.perf_counter() - t_eval
    tokens = []
    for t in S.tasks:
        enc = S.bb.tokenize(S.splits[t.name].val[0])
        tokens.append(float(enc["attention_mask"].sum(1).float().mean()))
    return {"round": 1, "n_val": N_VAL, "n_test": N_TEST, **c, "zeroshot_val": zs, "finetuned_val": ft,
            "learns_every_task": all(ft[k] - zs[k] >= 0.05 for k in ft),
            "ta_val_curve": {str(k): v for k, v in sorted(found.curve.items())},
            "ta_val_tuned": {"lambda": found.alpha, "val_norm": found.score},
            "zeroshot_val_norm": float(np.mean([zs[k] / ft[k] for k in ft])),
            "finetune_seconds": ft_seconds, "finetune_cached": all(i.get("cached") for i in S.ft_logs.values()),
            "val_eval_seconds": eval_seconds, "mean_tokens_val": float(np.mean(tokens)),
            "seconds": time.perf_counter() - t0}


def estimated_seconds(r: dict) -> float:
    return r["finetune_seconds"] + r["val_eval_seconds"] * (30 + 20 * r["n_test"] / r["n_val"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/quick_suite")
    ap.add_argument("--round", type=int, default=None, help="run only this round's candidates (the others are "
                    "read back from results.json)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    old = {}
    if args.round is not None and (out / "results.json").exists():
        old = {(tuple(r["tasks"]), r["n_train"], r["lr"]): r for r in json.loads((out / "results.json").read_text())["candidates"]}
    rows = []
    for c in CANDIDATES:
        prev = old.get((tuple(c["tasks"]), c["n_train"], c["lr"]))
        if prev is not None and c.get("round", 1) != args.round:
            rows.append(prev)
            continue
        r = run_candidate(c)
        rows.append(r)
        print(f"{','.join(c['tasks'])} n_train={c['n_train']} lr={c['lr']:g}: TA val-tuned λ={r['ta_val_tuned']['lambda']} "
              f"val norm {100 * r['ta_val_tuned']['val_norm']:.1f}; zero-shot {100 * r['zeroshot_val_norm']:.1f}; "
              f"fine-tune {r['finetune_seconds']:.0f}s, val eval {r['val_eval_seconds']:.1f}s", flush=True)
    ok = [r for r in rows if r["learns_every_task"] and r["ta_val_tuned"]["val_norm"] <= 0.93]
    # cost of a quick run ~ fine-tuning + evaluations (one val evaluation as the unit; ~60 of them)
    # a quick run's cost: fine-tuning + ~30 val evaluations + ~20 test evaluations (n_test / n_val of a val one)
    chosen = min(ok, key=estimated_seconds) if ok else None
    fallback = None
    if chosen is None:
        # no candidate shows the interference within budget: keep the 10-minute budget and take the candidate
        # with the most interference (lowest val-tuned TA) among those whose experts learn and that fit it
        # (fine-tuning budget: at most 2,000 training examples in all, ~64 steps, about 2 minutes on 2 quiet cores;
        # the measured seconds above are too noisy to rank on, several candidates shared the cores with other work)
        fit = [r for r in rows if r["learns_every_task"] and r["n_train"] * len(r["tasks"]) <= 2000]
        fallback = chosen = min(fit, key=lambda r: r["ta_val_tuned"]["val_norm"]) if fit else None
    (out / "results.json").write_text(json.dumps({"candidates": rows,
                                                  "chosen": chosen and {k: chosen[k] for k in ("tasks", "n_train", "lr")}},
                                                 indent=2))
    lines = ["# Choosing the `--quick` suite (validation only)", "", __doc__.split("\n\n")[1].replace("\n", " "), "",
             "Splits: val / test examples per task as listed (test carved first, never scored here). Rounds 2 "
             "to 5 were added, each after the rounds before it had no candidate meeting the rule; round 6 when the "
             "chosen suite's full quick run measured 9 min 47 s, too close to the 10-minute target. Seconds of rounds "
             "1-4 are wall time with other work sometimes sharing the 2 cores (round 1's third and fourth rows have "
             "the same number of steps), and their val evaluations were timed before evaluation batches were cut by "
             "padded tokens (about 2x faster since); rounds 5 and 6 ran on a quiet machine. \"zero-shot (norm)\" above 100 "
             "means the experts score below the pre-trained model on val.", "",
             "| round | tasks | n_train | n_val / n_test | lr | zero-shot (norm) | experts learn | TA val-tuned λ | TA val norm | fine-tune s | val eval s | tokens / example | est. run s |",
             "|---:|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['round']} | {', '.join(r['tasks'])} | {r['n_train']} | {r['n_val']} / {r['n_test']} | {r['lr']:g} | {100 * r['zeroshot_val_norm']:.1f} | "
                     f"{'yes' if r['learns_every_task'] else 'no'} | {r['ta_val_tuned']['lambda']:g} | "
                     f"{100 * r['ta_val_tuned']['val_norm']:.1f} | {r['finetune_seconds']:.0f}"
                     f"{' (cached)' if r['finetune_cached'] else ''} | {r['val_eval_seconds']:.1f} | {r['mean_tokens_val']:.1f} | {estimated_seconds(r):.0f} |")
    lines += ["", (f"Chosen{' (fallback: no candidate met the rule)' if fallback else ''}: {', '.join(chosen['tasks'])}, "
                   f"{chosen['n_train']} training examples, lr {chosen['lr']:g}, {chosen['n_val']} val / "
                   f"{chosen['n_test']} test examples per task.") if chosen else "No candidate met the rule."]
    if fallback:
        lines += ["", "No candidate brings val-tuned task arithmetic to 93% on val: on this backbone the interference of "
                  "text8 (88% normalised on test) needs experts fine-tuned on 2,000 examples of 8 tasks, whose training "
                  "alone takes longer than the quick run's 10-minute budget on 2 cores; experts trained on a few hundred "
                  "examples barely move from the base and merge almost without loss (above 100% of the experts on val "
                  "in round 2), and a larger learning rate (round 4) breaks the experts before it makes them interfere. "
                  "Fallback, fixed when that was seen: among candidates whose experts learn every task and "
                  "that fine-tune on at most 2,000 examples in all (about 2 minutes), the one with the most interference "
                  "(lowest val-tuned TA). The quick run shows the pipeline and every method family; the interference "
                  "itself is shown by the text8 table."]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
