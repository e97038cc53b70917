"""`submerge bench --suite llm`: the chat LLM fine-tuned per skill (LoRA by default), merged with every method the
suite runs, each merge scored by what it generates; the same rows, row cache, comparisons and report as the
encoder suite (:mod:`submerge.bench.run`), plus each row's answer NLL.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import torch

from submerge.bench.cache import RowCache, import_rows, read_resume
from submerge.bench.estimate import RunEstimate
from submerge.bench.llm.finetune import expert_log, train_expert
from submerge.bench.llm.session import LLMBenchConfig, LLMSession
from submerge.bench.presets import applicable_methods
from submerge.bench.run import check_results_folder, method_table, results_body, write_results
from submerge.device import busy_note
from submerge.io.ledger import one_run

# Every static method family that can merge the experts, with its LiNeS row, TALL masks (per-task models with the
# task id), ESM++ (routed per sequence from its prompt, and per token), AdaMerging and Representation Surgery on
# the val-tuned task arithmetic, TSV-M and ESM merges (the encoder suite's three).  The subspace methods also with
# rank_tol: a LoRA expert's update has rank 16, below the k = d/T directions per task their rules keep, so the
# rest is an arbitrary null-space basis (submerge.methods.subspace); 1e-4 lies in the gap of these experts'
# spectra (over all 1,260 adapted matrices of seed 0, σ_16 ≥ 3.1e-3 and σ_17 ≤ 1.8e-6 of the update's Frobenius
# norm), chosen from the spectra, not from scores.
LOW_RANK_ROWS = ("tsv[rank_tol=1e-4]", "iso_c[rank_tol=1e-4]", "iso_cts[rank_tol=1e-4]", "esm[rank_tol=1e-4]")
LLM_METHODS = ("linear", "task_arithmetic", "task_arithmetic+lines", "ties", "dare_ties", "breadcrumbs_ties",
               "della", "consensus_ta", "model_stock", "multislerp", "sce", "ram", "tsv", "iso_c", "iso_cts",
               "fisher", "regmean", "esm", "esm_pp", "tall_masks", "adamerging", "task_arithmetic+surgery",
               "tsv+surgery", "esm+surgery", *LOW_RANK_ROWS)


def llm_methods(n_tasks: int, names: Optional[list[str]]) -> list[str]:
    """The suite's rows: ``names`` (checked) or :data:`LLM_METHODS`."""
    return applicable_methods(n_tasks, names or list(LLM_METHODS))


def task_info(S: LLMSession) -> dict:
    out = {}
    for t in S.tasks:
        sp = S.splits[t.name]
        answers = Counter(q.answer for q in sp.test)
        out[t.name] = {"skill": t.skill, "n_train": len(sp.train), "n_val": len(sp.val), "n_test": len(sp.test),
                       "distinct_answers_test": len(answers),
                       "majority_test": answers.most_common(1)[0][1] / max(1, len(sp.test)),
                       "source": t.source, "license": t.license}
    return out


def multitask_row(S: LLMSession, done_rows: RowCache) -> tuple[dict, dict, dict]:
    """One model fine-tuned on every skill's training answers jointly, by the experts' recipe with as many steps
    as all experts together (each skill's answers seen as often as by its expert)."""
    label = "multitask (joint fine-tuning)"
    hit = done_rows.get("multitask")
    if hit is not None:
        (row,), res = hit[0], hit[1][label]
        return {**row, "kept": True}, res, {**row.get("train_log", {}), "cached": True}
    cfg = S.cfg
    recipe = dataclasses.replace(cfg.recipe, steps=cfg.recipe.steps * len(S.tasks))
    examples = [ex for t in S.tasks for ex in S.splits[t.name].train]
    key = S.expert_key([t.fingerprint() for t in S.tasks], len(examples), cfg.seed) + "-mt"
    folder = S.cache / "experts" / key
    t0 = time.perf_counter()
    state = train_expert(S.cm, examples, recipe, cfg.seed, folder, desc=f"{recipe.kind} multitask", quiet=cfg.quiet)
    info = expert_log(folder)
    row, res = S.test_row("multitask", "joint fine-tuning", {"steps": recipe.steps}, state, None,
                          time.perf_counter() - t0, label=label, reference="multitask")
    row["train_log"] = info
    done_rows.put("multitask", [row], {label: res})
    return row, res, info


PARTIAL = "results.partial.json"


@one_run
def run_llm_bench(out_dir: str | Path, cfg: Optional[LLMBenchConfig] = None, overwrite: bool = False,
                  backbone: Optional[str | Path] = None, resume: Optional[str | Path] = None) -> dict:
    """Run the LLM suite into ``out_dir``; ``backbone``: another local chat model folder instead of SmolLM2.
    As each method finishes, the table so far is written to ``out_dir/results.partial.json`` (replaced whole;
    removed when results.json is written), so a run longer than a session can be committed as it goes and
    continued elsewhere with ``resume`` (that file, or an earlier results.json: its rows are kept when this
    session's experts score every test question as that run's did)."""
    cfg = cfg or LLMBenchConfig()
    out_dir = check_results_folder(out_dir, overwrite)
    previous = read_resume(resume, cfg) if resume is not None else None
    methods = llm_methods(len(cfg.task_names), cfg.methods)
    estimate = RunEstimate(len(cfg.task_names), methods + (["multitask"] if cfg.multitask else []))
    note = None if cfg.quiet else busy_note(torch.get_num_threads())
    if note:
        print(f"note: {note}", flush=True)
    S = LLMSession(cfg, backbone)
    done_rows = RowCache(S, cfg)
    if previous is not None:
        S.adopt_experts(previous)  # the same experts by their keys: trained only if a row still needs them
        got = import_rows(S, done_rows, previous, methods)
        S.say(f"kept the rows of {len(got)} methods from {resume}" + (f": {', '.join(got)}" if got else ""))
    if any(done_rows.get(m) is None for m in methods):
        S.experts  # noqa: B018  (trained or read now, and checked against adopted scores before any row)

    def partial(rows_so_far: list[dict], correct_so_far: dict) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{PARTIAL}.tmp"
        tmp.write_text(json.dumps(_results(S, cfg, rows_so_far, correct_so_far, resume), indent=2))
        tmp.replace(out_dir / PARTIAL)

    rows, test_correct = method_table(S, methods, done_rows, estimate, progress=partial)
    if cfg.multitask:
        S.drop_experts()  # its training's peak memory then holds the base and one model, not seven models
        row, res, info = multitask_row(S, done_rows)
        S.ft_logs["multitask (all tasks jointly)"] = info
        test_correct[row["label"]] = res
        rows.append(row)
        S.say(f"[{S.clock()}] {row['label']}: norm {100 * row['avg_norm']:.1f}")
    results = _results(S, cfg, rows, test_correct, resume)
    write_results(results, out_dir)
    (out_dir / PARTIAL).unlink(missing_ok=True)
    S.say(f"wrote {out_dir}/results.json, results.md and plots in {results['seconds_total'] / 60:.1f} min")
    return results


def _results(S: LLMSession, cfg: LLMBenchConfig, rows: list[dict], test_correct: dict,
             resume: Optional[str | Path]) -> dict:
    return {
        "suite": cfg.suite if not cfg.tasks else "llm-custom",
        "backbone": {"name": S.cm.name, "path": str(S.cm.path), "sha256": S.fingerprint,
                     "params": S.cm.n_params(list(S.cm.pretrained))},
        "tasks": S.names,
        "task_info": task_info(S),
        "metric": "exact match of greedy decoding (teacher-forced), per test example; avg_nll: answer token NLL",
        **results_body(S, cfg, rows, test_correct, resume),
        "zeroshot_nll": {k: float(v.mean()) for k, v in (S.zs_test.nll or {}).items()},
        "finetuned_nll": {k: float(v.mean()) for k, v in (S.ft_test.nll or {}).items()},
        "experts_bytes": S.experts_bytes(),  # the experts as stored (LoRA: their adapters), for the storage columns
    }
