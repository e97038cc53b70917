"""``submerge analyze CONFIG OUT``: what the analyses read, in what order, and where they write.

CONFIG is a merge config (base, models, the merge to analyse) with, optionally, ``submerge tune``'s ``eval:``
block (per task: validation data and a scorer).  Three passes, each only when its inputs exist:

1. data-free, streamed one tensor at a time over the base and the experts (:mod:`.weights`), with ESM's view
   (:mod:`.essential`) on the same tensors when every model has calibration statistics (the models'
   ``calibration:`` entries, or ``--calibration`` folders in model order);
2. with a scorer: the merge made as ``submerge merge`` makes it (into a temporary folder inside OUT's temporary
   folder, removed before OUT appears), then paths, retention and calibration (:mod:`.paths`) — this pass holds
   the base, the experts and the merge in memory;
3. the report: ``analysis.json``, ``analysis.md`` and PNGs (:mod:`.report`).

OUT is written atomically, as a merge is.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from submerge.errors import ConfigError
from submerge.io.ledger import one_run

log = logging.getLogger("submerge")

EVAL_ONLY_KEYS = ("eval", "objective")


def _split(raw: Any, source: str) -> tuple[dict, Optional[dict], list[Optional[str]]]:
    """The merge config, the eval block, and each model's ``name:`` (as tune's configs give it)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping")
    merge = {k: v for k, v in raw.items() if k not in EVAL_ONLY_KEYS}
    names: list[Optional[str]] = []
    if isinstance(merge.get("models"), list):
        models = []
        for m in merge["models"]:
            if isinstance(m, dict) and "name" in m:
                names.append(str(m["name"]))
                m = {k: v for k, v in m.items() if k != "name"}
            else:
                names.append(None)
            models.append(m)
        merge["models"] = models
    return merge, raw.get("eval"), names


def _task_names(cfg, given: list[Optional[str]]) -> list[str]:
    names = [n or Path(str(m.model).split("+")[-1].split("@")[0]).name
             for n, m in zip(given + [None] * len(cfg.models), cfg.models)]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"models: task name(s) {dup} used twice; give each model a distinct 'name:'")
    return names


@one_run
def analyze(config: Union[str, Path], out_dir: Union[str, Path], *, calibration: Sequence[str] = (),
            scorer: Optional[str] = None, topk: float = 0.2, points: int = 5, pairs: bool = True,
            spectra: bool = True, overwrite: bool = False, progress: bool = True) -> dict:
    """Run the analyses of ``config`` into folder ``out_dir``; returns what ``analysis.json`` holds."""
    from submerge.engine.config import MAX_CONFIG_BYTES, load_yaml_text, parse_config
    from submerge.engine.plan import plan_merge, resolve_model_path
    from submerge.io import check_output_target
    from submerge.io.files import read_config_text
    from submerge.stats.load import load_stats

    t_start = time.perf_counter()
    cpath = Path(config)
    config_dir = cpath.resolve().parent
    text = read_config_text(cpath, limit=MAX_CONFIG_BYTES)
    merge_raw, eval_raw, given_names = _split(load_yaml_text(text, str(cpath)), str(cpath))
    cfg = parse_config(merge_raw, str(cpath))
    if not cfg.models or cfg.slices is not None:
        raise ConfigError(f"{cpath}: analyze reads whole models: list them under 'models:' (no slices)")
    if not cfg.base_model:
        raise ConfigError(f"{cpath}: analyze measures task vectors against the base: give 'base_model:'")
    if not 0 < topk <= 1:
        raise ConfigError(f"--topk must be in (0, 1], got {topk}")
    if type(points) is not int or points < 3:
        raise ConfigError(f"--points must be an integer >= 3 (the endpoints and one interior point), got {points}")
    tasks = _task_names(cfg, given_names)
    if scorer is not None and eval_raw is None:
        raise ConfigError(f"--scorer {scorer}: the config has no 'eval:' block naming each task's validation data")
    if calibration and len(calibration) != len(cfg.models):
        raise ConfigError(f"--calibration: {len(calibration)} folder(s) for {len(cfg.models)} models (one per model, "
                          f"in order)")
    cal_refs = list(calibration) or [m.calibration for m in cfg.models]
    stats = None
    if all(cal_refs):
        stats = [load_stats(resolve_model_path(str(c), config_dir)) for c in cal_refs]
        bad = [str(c) for c, s in zip(cal_refs, stats) if getattr(s, "kind", "calibration") != "calibration"]
        if bad:
            raise ConfigError(f"calibration {bad[0]}: ESM's view needs Gram statistics (`submerge calibrate`), "
                              f"not a Fisher folder")
    elif any(cal_refs):
        log.warning("only some models have calibration statistics: ESM's view is skipped")
    eval_tasks = _eval_tasks(eval_raw, cfg, tasks, config_dir, scorer) if eval_raw is not None else None

    plan = plan_merge(cfg, config_dir)  # every model resolved and checked before anything is read
    out = check_output_target(out_dir, plan.inputs + [cpath] + [Path(str(c)) for c in cal_refs if c],
                              "analysis folder")
    if out.exists() and not overwrite:
        raise ConfigError(f"analysis folder {out_dir} already exists (pass --overwrite to replace it)")

    try:
        return _run(cfg, cpath, config_dir, plan, out_dir, overwrite, tasks, stats, eval_tasks, topk, points, pairs,
                    spectra, progress, t_start)
    finally:
        plan.close()


def _run(cfg, cpath, config_dir, plan, out_dir, overwrite, tasks, stats, eval_tasks, topk, points, pairs, spectra,
         progress, t_start) -> dict:
    from tqdm.auto import tqdm

    from submerge.analysis.essential import EssentialAnalyzer
    from submerge.analysis.report import write_report
    from submerge.analysis.weights import WeightAnalyzer
    from submerge.io import atomic_folder
    from submerge.methods.subspace import is_embedding

    base_key = cfg.base_model
    keys = [m.model for m in cfg.models]
    say = _sayer(progress)
    result: dict = {"config": str(cpath), "tasks": tasks, "base": base_key, "merge_method": cfg.merge_method,
                    "options": {"topk": topk, "points": points, "pairs": pairs, "spectra": spectra}}
    with atomic_folder(out_dir, overwrite, "analysis folder", inputs=plan.inputs + [cpath]) as tmp:
        # ---- 1. data-free, streamed
        t0 = time.perf_counter()
        wa = WeightAnalyzer(tasks, topk=topk, spectra=spectra)
        ea = EssentialAnalyzer(tasks, stats) if stats is not None else None
        names = [j.out_name for j in plan.jobs]
        wa.set_names(names)
        jobs = [j for j in plan.jobs if j.copy_from is None and j.base is not None]
        for job in tqdm(jobs, desc="analyze", unit="tensor", disable=not progress):
            base = plan.models[job.base[0]].read(job.base[1])
            experts = [plan.models[k].read(n) for k, n in job.inputs]
            if len(experts) != len(tasks) or any(e.shape != base.shape for e in experts):
                continue
            rec = wa.add(job.out_name, base, experts, embedding=is_embedding(job.out_name))
            if ea is not None and wa.last_vectors is not None:
                ea.add(job.out_name, rec.role, rec.block, base, experts, wa.last_vectors, wa.last_svals)
            del base, experts
        result["weights"] = wa.summary()
        result["weights"]["seconds"] = round(time.perf_counter() - t0, 2)
        result["per_tensor"] = [r.__dict__ for r in wa.records]
        if ea is not None:
            result["essential"] = ea.summary()
        say(f"data-free pass: {len(wa.records)} tensors in {result['weights']['seconds']} s")
        # ---- 2. with a scorer
        if eval_tasks is not None:
            t0 = time.perf_counter()
            result["paths"] = _scored(cfg, cpath, config_dir, plan, base_key, keys, tasks, eval_tasks, tmp,
                                      points, pairs, say)
            result["paths"]["seconds"] = round(time.perf_counter() - t0, 2)
        result["seconds"] = round(time.perf_counter() - t_start, 2)
        write_report(result, tmp)
    return result


def _sayer(progress: bool):
    def say(msg: str) -> None:
        if progress:
            print(f"[analyze] {msg}", flush=True)
        log.info(msg)
    return say


def _eval_tasks(eval_raw: Any, cfg, tasks: list[str], config_dir: Path, scorer: Optional[str]) -> list:
    from submerge.evaluate.registry import make_scorer
    from submerge.evaluate.tasks import TaskRef
    from submerge.evaluate.tasks import eval_tasks as parse_eval

    entries = [TaskRef(n, str(m.model)) for n, m in zip(tasks, cfg.models)]
    block = dict(eval_raw) if isinstance(eval_raw, dict) else eval_raw
    if scorer is not None and isinstance(block, dict):
        if scorer.startswith("python:"):  # a file named on the command line is relative to the current folder
            mod, sep, fn = scorer[len("python:"):].strip().rpartition(":")
            if sep and mod.endswith(".py"):
                mod = str(Path(mod).expanduser().absolute())
            block["scorer"] = {"python": f"{mod}{sep}{fn}"}
        else:
            block["scorer"] = scorer
        if isinstance(block.get("tasks"), dict):
            block["tasks"] = {k: ({kk: vv for kk, vv in v.items() if kk != "scorer"} if isinstance(v, dict) else v)
                              for k, v in block["tasks"].items()}
        elif isinstance(block.get("tasks"), list):
            block["tasks"] = [({kk: vv for kk, vv in v.items() if kk != "scorer"} if isinstance(v, dict) else v)
                              for v in block["tasks"]]
    out = parse_eval(block, entries, config_dir)
    for t in out:
        make_scorer(t).check()
    return out


def _read_all(ckpt) -> dict:
    return {n: ckpt.read(n) for n in ckpt.tensors}


def _scored(cfg, cpath: Path, config_dir: Path, plan, base_key: str, keys: list[str], tasks: list[str],
            eval_tasks: list, tmp: Path, points: int, pairs: bool, say) -> dict:
    from submerge.analysis.paths import Evaluator, analyze_paths
    from submerge.api import merge, with_abs_paths
    from submerge.engine.plan import MergeOptions
    from submerge.evaluate.worker import SweepWorker
    from submerge.io import Checkpoint

    say(f"merging with {cfg.merge_method} (as `submerge merge` does) for the scored analyses")
    merged_dir = tmp / ".merged"
    res = merge(with_abs_paths(cfg, config_dir), merged_dir, MergeOptions(quiet=True, write_card=False, copy_tokenizer=False))
    with Checkpoint(merged_dir, label="merge") as ck:
        merged = _read_all(ck)
    import shutil

    shutil.rmtree(merged_dir)
    base = _read_all(plan.models[base_key])
    experts = [_read_all(plan.models[k]) for k in keys]
    shared = set(base) & set(merged)
    base = {k: v for k, v in base.items() if k in shared}
    merged = {k: v for k, v in merged.items() if k in shared}
    bodies = [{k: e[k] for k in shared} for e in experts]  # the merged tensors of each expert
    worker = SweepWorker(base, bodies, eval_tasks, {"kind": "mean"})
    worker.experts = experts  # each task's own tensors (its classifier) come from its whole expert
    ev = Evaluator(worker)
    out = analyze_paths(ev, base, bodies, merged, points=points,
                        pairs=pairs, progress=say)
    out["merge_seconds"] = round(res.seconds, 2)
    return out
