"""`submerge bench`: fine-tune one expert per task, merge them with every applicable method, score, write
``results.json``, ``results.md`` and the plots.  Scales (lambda) are chosen on the validation split only (max mean
normalised val accuracy); each reported number touches the test split once.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from submerge.bench.cache import RowCache, import_rows, read_resume
from submerge.bench.estimate import RunEstimate
from submerge.bench.evaluate import bootstrap_ci, pack_correct, paired_diff_ci
from submerge.bench.presets import applicable_methods, row_params, split_row_name, stats_for
from submerge.bench.rows import method_rows
from submerge.bench.session import BenchConfig, BenchSession, suite_tasks
from submerge.device import busy_note, release_memory
from submerge.errors import ConfigError
from submerge.io import check_output_target
from submerge.io.ledger import one_run
from submerge.methods import get_method
from submerge.version import __version__

log = logging.getLogger("submerge.bench")


def check_results_folder(out_dir: str | Path, overwrite: bool) -> Path:
    """A results folder a bench may write: not a dangerous folder or an input, and an earlier run's results.json
    there replaced only with ``overwrite``."""
    out_dir = Path(out_dir)
    check_output_target(out_dir, what="results folder")
    if (out_dir / "results.json").exists() and not overwrite:
        raise ConfigError(f"results folder {out_dir} already holds a results.json (pass --overwrite to replace it, "
                          f"or --out for another folder)")
    return out_dir


def method_table(S, methods: Sequence[str], done_rows: RowCache, estimate: RunEstimate, backend: str = "local",
                 address: Optional[str] = None, actors: Optional[int] = None,
                 progress: Optional[Callable[[list[dict], dict], None]] = None) -> tuple[list[dict], dict]:
    """Every method's rows and per-example test correctness, in ``methods``' order, for any suite's session
    (:class:`~submerge.bench.session.SuiteSession`): rows kept in ``done_rows`` are not redone, each finished
    method is put there as it finishes, and methods reading the same statistics run one after the other.
    ``progress(rows, test_correct)``: called with the rows so far each time a method finishes."""
    say = S.say
    rows, test_correct = [], {}
    methods = list(methods)
    # methods that read the same statistics run one after the other, so each kind is held only while used
    # (Fisher and calibration statistics alive together made the peak of a quick run)
    method_of = {n: get_method(split_row_name(n)[0]) for n in methods}
    kind = {n: method_of[n].stats_kind if method_of[n].uses_stats(row_params(n)) else "" for n in methods}
    methods.sort(key=lambda n: {"": 0, "fisher": 1}.get(kind[n], 2))
    say(f"[{S.clock()}] merging with {len(methods)} methods: {', '.join(methods)}"
        + (" (on Ray)" if backend == "ray" else ""))
    found_rows: dict[str, Optional[tuple[list[dict], dict]]] = {}
    searched: dict[str, object] = {}
    for method in methods:
        hit = done_rows.get(method)
        if hit is not None:  # a killed run's finished methods are not redone
            hit = ([{**r, "kept": True} for r in hit[0]], hit[1])  # computed earlier: its time is its own
            found_rows[method] = hit
            estimate.method_done(method, None)
            say(f"{method}: rows kept from an earlier run with the same settings")
            for r in hit[0]:  # its val-tuned scale, for "<method>+surgery"
                if r.get("setting") == "val-tuned" and r.get("alpha") is not None:
                    searched[f"alpha:{method}"] = r["alpha"]
    todo = [n for n in methods if n not in found_rows]

    def finished(method: str, got, seconds: float) -> None:
        found_rows[method] = got
        if got is not None:
            done_rows.put(method, *got)
        estimate.method_done(method, seconds)
        say(f"[{S.clock()}] {method}: {seconds:.0f}s {estimate.line()}")
        if progress is not None:
            done = [m for m in methods if found_rows.get(m) is not None]
            progress([r for m in done for r in found_rows[m][0]],
                     {k: v for m in done for k, v in found_rows[m][1].items()})

    if backend == "ray" and todo:
        from submerge.bench.ray import ray_method_rows

        ray_method_rows(S, todo, finished, address=address, actors=actors,
                        alphas={k: v for k, v in searched.items() if k.startswith("alpha:")})
    else:
        # statistics (Fisher, calibration) are dropped after the last method that reads them
        last_use = {kind[n]: i for i, n in enumerate(todo) if kind[n]}
        for i, method in enumerate(todo):
            t0 = time.perf_counter()
            stats = stats_for(S, method)
            if stats is not None and last_use.get(kind[method]) == i:
                S.drop_stats(kind[method])
            got = method_rows(S, method, stats, searched, done_rows.partial(method))
            # a search holds three model-sized buffers, a merge one: release them before the next method
            # (keeping them made a full run grow by ~0.3 GB per method on a 23M-parameter backbone)
            stats = None
            release_memory()
            finished(method, got, time.perf_counter() - t0)
    for method in methods:  # the table keeps the method order whatever order the rows finished in
        if found_rows.get(method) is not None:
            rows += found_rows[method][0]
            test_correct.update(found_rows[method][1])
    return rows, test_correct


def comparisons(test_correct: dict, ft_test: dict, zs_test: dict) -> dict:
    """Every row against the strongest static baseline (TSV-M) and against task arithmetic, both val-tuned, on
    the normalised score (paired over test examples), and the experts against the base."""
    out = {}
    order = list(ft_test)
    ft_norm = [float(ft_test[k].mean()) for k in order]
    for ref in ("tsv (val-tuned)", "task_arithmetic (val-tuned)"):
        if ref not in test_correct:
            continue
        for label, res in test_correct.items():
            if label != ref:
                d, lo, hi = paired_diff_ci([res[k] for k in order], [test_correct[ref][k] for k in order], ft_norm)
                out[f"{label} - {ref}"] = {"norm_diff": d, "ci95": [lo, hi]}
    d, lo, hi = paired_diff_ci([ft_test[k] for k in order], [zs_test[k] for k in order])
    out["finetuned - zeroshot (abs)"] = {"abs_diff": d, "ci95": [lo, hi]}
    return out


def results_body(S, cfg, rows: list[dict], test_correct: dict, resume: Optional[str | Path] = None) -> dict:
    """What every suite's results.json holds besides its backbone and tasks: the references with their intervals,
    the rows, the paired comparisons, the settings, every row's per-example test correctness, times, versions."""
    ft_test, zs_test = S.ft_test, S.zs_test
    suite = cfg.suite if not cfg.tasks else "custom"
    return {
        "zeroshot": {k: float(v.mean()) for k, v in zs_test.items()},
        "zeroshot_ci": {k: bootstrap_ci(v) for k, v in zs_test.items()},
        "finetuned": {k: float(v.mean()) for k, v in ft_test.items()},
        "finetuned_ci": {k: bootstrap_ci(v) for k, v in ft_test.items()},
        "finetune_log": S.ft_logs,
        "rows": rows,
        "comparisons": comparisons(test_correct, ft_test, zs_test),
        "seed": cfg.seed,
        # where the experts were cached changes no number (and is often a temporary path): not recorded
        "config": {**{k: v for k, v in asdict(cfg).items() if k != "cache_dir"}, "suite": suite,
                   "recipe": asdict(cfg.recipe)},
        "warnings": list(S.warnings),
        # per test example, 1 = correct, packed (submerge.bench.evaluate.unpack_correct(hex, n_test)): any
        # paired comparison can be recomputed from results.json alone
        "per_example": {"rows": {label: {k: pack_correct(v) for k, v in res.items()}
                                 for label, res in test_correct.items()},
                        "finetuned": {k: pack_correct(v) for k, v in ft_test.items()},
                        "zeroshot": {k: pack_correct(v) for k, v in zs_test.items()}},
        "seconds_total": time.perf_counter() - S.t_start,
        # what the table cost to compute, kept rows and cached experts at the time they took then
        "seconds_compute": sum(float(r.get("seconds") or 0) for r in rows)
        + sum(float(v.get("seconds") or 0) for v in S.ft_logs.values() if isinstance(v, dict)),
        **({"resumed_from": str(resume)} if resume is not None else {}),  # rows kept: their time is not in the total
        "versions": {"submerge": __version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "python": platform.python_version()},
    }


def write_results(results: dict, out_dir: Path) -> None:
    """results.json (replaced whole: a --resume of the same file never sees half of it), then the report."""
    from submerge.bench.report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a refused or failed run leaves no empty OUT
    tmp = out_dir / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out_dir / "results.json")
    write_report(results, out_dir)


@one_run
def run_bench(out_dir: str | Path, cfg: Optional[BenchConfig] = None, backend: str = "local",
              address: Optional[str] = None, actors: Optional[int] = None,
              resume: Optional[str | Path] = None, overwrite: bool = False) -> dict:
    """Run the benchmark into ``out_dir`` (an earlier run's results there are replaced only with ``overwrite``).
    ``backend="ray"`` computes the method rows on Ray actors
    (``address``: a running cluster, else a local one; ``actors``: how many, default one per CPU), each
    holding the session's experts and statistics from the object store; the rows are the local ones.
    ``resume``: an earlier run's results.json with the same settings and experts (see :func:`import_rows`):
    its rows are kept and only the missing methods are computed (adding a method to a published table)."""
    cfg = cfg or BenchConfig()
    out_dir = check_results_folder(out_dir, overwrite)
    if backend not in ("local", "ray"):
        raise ConfigError(f"unknown backend {backend!r}; use local or ray")
    if backend == "ray":
        from submerge.evaluate.backends import check_ray_address

        check_ray_address(address)
    previous = read_resume(resume, cfg) if resume is not None else None  # before any model or data is read
    n_tasks = len(suite_tasks(cfg))
    methods = applicable_methods(n_tasks, cfg.methods)
    estimate = RunEstimate(n_tasks, methods + (["multitask"] if cfg.multitask else []))
    note = None if cfg.quiet else busy_note(torch.get_num_threads())
    if note:  # after every check: a refused run prints its one error line only
        print(f"note: {note}", flush=True)
    S = BenchSession(cfg, estimate=estimate)
    say, tasks, names, bb = S.say, S.tasks, S.names, S.bb
    done_rows = RowCache(S, cfg)
    if previous is not None:
        got = import_rows(S, done_rows, previous, methods)
        say(f"kept the rows of {len(got)} methods from {resume}" + (f": {', '.join(got)}" if got else ""))
    rows, test_correct = method_table(S, methods, done_rows, estimate, backend=backend, address=address,
                                      actors=actors)
    if cfg.multitask:
        label = "multitask (joint fine-tuning)"
        hit = done_rows.get("multitask")  # its row is kept with the methods' (the model may be gone)
        if hit is not None:
            (row,), res = hit[0], hit[1][label]
            info = {**row.get("train_log", {}), "cached": True}
        else:
            t0 = time.perf_counter()
            weights = [1.0 / len(tasks)] * len(tasks)
            state, info = S.train_multitask(weights, cfg.seed)
            row, res = S.test_row("multitask", "joint fine-tuning", {"weights": weights}, state, None,
                                  time.perf_counter() - t0, label=label, reference="multitask")
            row["train_log"] = info
            done_rows.put("multitask", [row], {label: res})
            del state
        S.ft_logs["multitask (all tasks jointly)"] = info
        test_correct[label] = res
        rows.append(row)
        estimate.method_done("multitask", None if info.get("cached") else info.get("seconds"))
        say(f"[{S.clock()}] {label}: norm {100 * row['avg_norm']:.1f} "
            f"({'cached' if info.get('cached') else 'trained in {:.0f}s'.format(info['seconds'])}) {estimate.line()}")
    splits = S.splits
    suite = cfg.suite if not cfg.tasks else "custom"
    results = {
        "suite": suite,
        "backbone": {"name": bb.name, "path": str(bb.path), "sha256": bb.fingerprint,
                     "params": int(sum(v.numel() for v in bb.pretrained.values()))},
        "tasks": names,
        "task_info": {t.name: {"classes": list(t.class_names), "n_train": len(splits[t.name].train[0]),
                               "n_val": len(splits[t.name].val[0]), "n_test": len(splits[t.name].test[0]),
                               "majority_test": float(np.bincount(splits[t.name].test[1]).max() / len(splits[t.name].test[1])),
                               "source": t.source, "license": t.license} for t in tasks},
        **results_body(S, cfg, rows, test_correct, resume),
    }
    write_results(results, out_dir)
    say(f"wrote {out_dir}/results.json, results.md and plots in {results['seconds_total'] / 60:.1f} min")
    return results
