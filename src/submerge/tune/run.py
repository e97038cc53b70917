"""``submerge tune``: choose a merge method and its parameters on the user's validation data.

Steps, each checked before the next costs anything:

1. read the tune config (keys, methods, parameters, eval files and fields, scorer imports), check OUT and the
   Ray address, and plan the merge against the checkpoints' headers (files, shapes, Hub ids);
2. read the base and every expert once (tensors in memory, in float32);
3. compute the statistics a candidate needs and no folder provides (calibration, Fisher), cached by model
   fingerprint and inputs in ``~/.cache/submerge/calibration`` (one Ray task per expert on Ray);
4. score every expert on its own task (the normalisation), then every candidate: merges in memory, scales
   along the affine path (``search_alpha`` for ``auto``), every task scored;
5. write the best candidate as a normal merge folder (the streamed executor, as ``submerge merge``) with
   ``tune.json``, ``tune.md`` and ``tune.png`` beside it, atomically.

Validation data only: nothing here reads test data.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from submerge.errors import ConfigError
from submerge.evaluate.worker import CandidateResult, Point
from submerge.io.ledger import one_run
from submerge.tune.spec import Candidate, TuneSpec, load_tune, parse_tune

log = logging.getLogger("submerge.tune")


@dataclass
class TuneResult:
    out_dir: Path
    winner: Optional[dict]
    results: list[CandidateResult]
    expert_scores: dict[str, float]
    seconds: float
    errors: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)


def _cache_root(cache_dir: Optional[Union[str, Path]]) -> Path:
    from submerge.io.caches import cache_folder

    return cache_folder("calibration", cache_dir)


def _stats_folder(kind: str, model_dir: Path, spec: dict, root: Path) -> Path:
    """Where one model's statistics are cached: keyed by the model's fingerprint, the inputs' content and
    every setting (as ``submerge calibrate`` fingerprints the model it ran on)."""
    from submerge.io.files import file_sha256
    from submerge.stats.folder import model_fingerprint

    blob = json.dumps({"kind": kind, "model": model_fingerprint(model_dir), "inputs": file_sha256(spec["inputs"]),
                       **{k: (str(v) if isinstance(v, Path) else v) for k, v in spec.items() if k != "inputs"}},
                      sort_keys=True)
    return root / f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:20]}"


def _compute_stats(kind: str, model_dir: str, spec: dict, folder: str, task: str) -> str:
    """Runs where the backend puts it (a Ray task on Ray): writes ``folder`` and returns it."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "calibration":
        from submerge.stats.gram import calibrate_model_dir

        calibrate_model_dir(model_dir, spec["inputs"], folder, n=spec["n"], max_length=spec["max_length"],
                            batch_size=spec["batch_size"], seed=spec["seed"], task=task, layers=spec["layers"],
                            field_name=spec["field"], overwrite=True, progress=False, device=device)
    else:
        from submerge.stats.fisher import fisher_model_dir

        fisher_model_dir(model_dir, spec["inputs"], folder, n=spec["n"], kind=spec["kind"],
                         label_field=spec["label_field"], field_name=spec["field"], max_length=spec["max_length"],
                         seed=spec["seed"], task=task, overwrite=True, progress=False, device=device)
    return folder


def _load_tensors(plan) -> tuple[Optional[dict], list[dict]]:
    """The base and each model's merged tensors, read once through the executor's reader (Hub ids, adapters,
    shards, dtypes handled as in a merge), in the compute dtype."""
    from submerge.engine.executor import Executor, MergeOptions

    cfg = plan.config
    keys = [m.model for m in cfg.models]
    ex = Executor(plan, MergeOptions(quiet=True, prefetch=False))
    base: Optional[dict] = {} if cfg.base_model else None
    experts: list[dict] = [{} for _ in keys]
    for job in plan.jobs:
        if job.copy_from is not None:
            t = plan.models[job.copy_from[0]].read(job.copy_from[1])
            for sd in ([base] if base is not None else []) + experts:
                sd[job.out_name] = t
            continue
        tensors, b = ex.load(job)
        by_key = {k: t for (k, _), t in zip(job.inputs, tensors)}
        for i, k in enumerate(keys):
            experts[i][job.out_name] = by_key[k]
        if base is not None:
            base[job.out_name] = b
    return base, experts


def _check_stats_sources(spec: TuneSpec) -> None:
    for kind in sorted(spec.stats_kinds()):
        for i, e in enumerate(spec.models):
            job = e.stats.get(kind)
            if job is None or (job.folder is None and not (job.spec or {}).get("inputs")):
                what = ("calibrate: {inputs: FILE} (or calibration: FOLDER)" if kind == "calibration"
                        else "fisher: {inputs: FILE} (or fisher: FOLDER)")
                users = sorted({c.method for c in spec.candidates})
                raise ConfigError(f"models[{i}] ({e.name}): a candidate ({', '.join(users)}) needs {kind} statistics; "
                                  f"give {what}")
            if job.folder is not None and not job.folder.exists():
                raise ConfigError(f"models[{i}] ({e.name}): statistics folder {job.folder} does not exist")
            if job.spec is not None and not Path(job.spec["inputs"]).is_file():
                raise ConfigError(f"models[{i}] ({e.name}): {kind} inputs {job.spec['inputs']} do not exist")
            if job.spec is not None and "+" in e.ref and not Path(e.ref).exists():
                raise ConfigError(f"models[{i}] ({e.name}): {kind} statistics of a base+adapter model cannot be "
                                  f"computed here; give a folder (submerge {kind if kind == 'fisher' else 'calibrate'} "
                                  f"on the merged-in adapter)")


@one_run
def tune(config: Union[str, Path, dict], out_dir: Union[str, Path], *, backend: str = "local",
         address: Optional[str] = None, overwrite: bool = False, quiet: bool = False,
         cache_dir: Optional[Union[str, Path]] = None, threads: Optional[int] = None, actors: Optional[int] = None,
         random_seed: int = 0, config_dir: Optional[Union[str, Path]] = None) -> TuneResult:
    """Run a tune config (a YAML path or a dict) and write the best merge into ``out_dir``.

    ``backend``: ``local`` or ``ray`` (``address``: a running cluster's host:port, or a new local one).
    Returns every candidate's validation scores and the winner; raises a
    :class:`~submerge.errors.SubmergeError` on bad input before any expensive work.
    """
    from submerge.api import config_inputs
    from submerge.engine.plan import plan_merge
    from submerge.evaluate.backends import check_ray_address, make_backend
    from submerge.io import check_output_target

    t_start = time.perf_counter()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    if isinstance(config, (str, Path)):
        spec = load_tune(config)
        config_path: Optional[Path] = Path(config)
    else:
        spec = parse_tune(config, Path(config_dir or ".").resolve())
        config_path = None
    if backend not in ("local", "ray"):
        raise ConfigError(f"unknown backend {backend!r}; use local or ray")
    if backend == "local" and address:
        raise ConfigError("--address is for --backend ray")
    out = Path(out_dir)
    # a plan that reads every model and the base once (files, headers, shapes, Hub ids)
    probe = spec.merge_config("task_arithmetic" if spec.merge.get("base_model") else "linear", {"weight": 1.0},
                              model_params=False)
    data_files = [t.data for t in spec.tasks] + [j.spec["inputs"] for e in spec.models for j in e.stats.values()
                                                 if j.spec is not None and j.spec.get("inputs")]
    inputs = config_inputs(probe, None) + data_files + ([config_path] if config_path else [])
    check_output_target(out, inputs, "tune output")
    if out.exists() and not overwrite:
        raise ConfigError(f"output folder {out} already exists (pass --overwrite to replace it)")
    _check_stats_sources(spec)
    if backend == "ray":
        check_ray_address(address)
    plan = plan_merge(probe, None)  # files, headers, shapes, Hub ids: before anything is read
    for t, m in zip(spec.tasks, probe.models):
        t.expert = plan.models[m.model].path  # the local folder (a Hub id's snapshot; an adapter's base)
    say(f"tune: {len(spec.candidates)} candidate(s) on {len(spec.models)} task(s) "
        f"({', '.join(spec.task_names)}), backend {backend}")
    try:
        base, experts = _load_tensors(plan)
    finally:
        plan.close()
    n_params = sum(v.numel() for v in experts[0].values())
    say(f"[{_clock(t_start)}] read the base and {len(experts)} experts ({n_params / 1e6:.1f}M parameters each)")

    runner = make_backend(backend, address, threads, actors)
    try:
        stats = _prepare_stats(spec, runner, cache_dir, say, t_start)
        worker_args = dict(base=base, experts=experts, tasks=spec.tasks, objective=spec.objective, stats=stats,
                           model_params=[e.parameters for e in spec.models], random_seed=random_seed)
        runner.start(worker_args)
        expert_scores = runner.expert_scores()
        say(f"[{_clock(t_start)}] experts on their own tasks: "
            + ", ".join(f"{k} {v:.4g}" for k, v in expert_scores.items()))
        cma = functools.partial(_cma_state, spec, cache_dir, random_seed)
        results = _sweep(runner, spec.candidates, quiet, len(spec.models), random_seed, cma, say)
    finally:
        runner.close()
    errors = [r.error for r in results if r.error]
    ok = [r for r in results if r.error is None and r.best is not None]
    if not ok:
        raise ConfigError("every candidate failed:\n" + "\n".join(errors))
    win = max(ok, key=lambda r: (r.best.objective, -(r.best.scale or 0.0), -r.index))
    cand = spec.candidates[win.index]
    report = _report(spec, results, expert_scores, win, backend, t_start)
    say(f"[{_clock(t_start)}] best: {cand.label} -> {_winner_text(cand, win.best)}, objective "
        f"{win.best.objective:.4f}")
    _write(spec, cand, win.best, stats, out, overwrite, quiet, inputs, report, random_seed)
    report["seconds_total"] = time.perf_counter() - t_start
    say(f"[{_clock(t_start)}] wrote {out} (tune.json, tune.md, tune.png beside the model)")
    return TuneResult(out, report["winner"], results, expert_scores, time.perf_counter() - t_start, errors, report)


def _clock(t0: float) -> str:
    s = int(time.perf_counter() - t0)
    return f"{s // 60}:{s % 60:02d}"


def _prepare_stats(spec: TuneSpec, runner, cache_dir, say, t_start) -> dict[str, list]:
    """Per statistics kind a candidate needs: one folder per expert (given, cached, or computed now)."""
    root = _cache_root(cache_dir)
    out: dict[str, list] = {}
    for kind in sorted(spec.stats_kinds()):
        folders: list[Optional[str]] = []
        todo = []
        for i, (e, t) in enumerate(zip(spec.models, spec.tasks)):
            job = e.stats[kind]
            if job.folder is not None:
                folders.append(str(job.folder))
                continue
            folder = _stats_folder(kind, t.expert, job.spec, root)
            folders.append(str(folder))
            if not (folder / "manifest.json").is_file():
                todo.append((i, e.name, str(t.expert), dict(job.spec), str(folder)))
        if todo:
            root.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            runner.compute_stats([functools.partial(_compute_stats, kind, model_dir, s, folder, name)
                                  for _, name, model_dir, s, folder in todo])
            say(f"[{_clock(t_start)}] {kind} statistics of {len(todo)} expert(s) in {time.perf_counter() - t0:.0f}s "
                f"(cached in {root})")
        else:
            say(f"[{_clock(t_start)}] {kind} statistics: all given or cached")
        out[kind] = folders
    return out


def _cma_state(spec: TuneSpec, cache_dir, random_seed: int, cand: Candidate) -> Path:
    """Where a CMA-ES candidate's search is saved between generations (the tune cache)."""
    from submerge.io.caches import cache_folder
    from submerge.stats.folder import model_fingerprint
    from submerge.tune.evolve import state_key

    prints = [model_fingerprint(Path(t.expert)) for t in spec.tasks]
    return cache_folder("tune", cache_dir) / f"cma-{state_key(spec.raw, cand, random_seed, prints)}.pkl"


def _sweep(runner, candidates: list[Candidate], quiet: bool, n_models: int = 0, random_seed: int = 0,
           cma_state=None, say=lambda *a: None) -> list[CandidateResult]:
    from tqdm.auto import tqdm

    from submerge.tune.evolve import run_cma

    evolved = {c.index: run_cma(runner, c, n_models, random_seed, cma_state(c) if cma_state else None, say)
               for c in candidates if c.evolve is not None}
    for r in evolved.values():
        if r.error is None:
            say(f"  {r.label}: best objective {r.best.objective:.4f} ({len(r.points)} point(s), {r.seconds:.0f}s)")
    candidates = [c for c in candidates if c.evolve is None]
    results: dict[int, CandidateResult] = dict(evolved)
    with tqdm(total=len(candidates), desc="candidates", unit="cand", disable=quiet, dynamic_ncols=True) as bar:
        def on_result(r: CandidateResult) -> None:
            results[r.index] = r
            bar.update(1)
            if r.error:
                bar.write(f"error: {r.error}")
            elif not quiet:
                b = r.best
                bar.write(f"  {r.label}: best objective {b.objective:.4f}"
                          + (f" at {b.scale:g}" if b.scale is not None else "")
                          + f" ({len(r.points)} point(s), {r.seconds:.0f}s)")
        runner.run(candidates, on_result)
    return [results[i] for i in sorted(results)]


def _winner_text(cand: Candidate, p: Point) -> str:
    from submerge.methods import get_method

    if getattr(cand, "learn", None) is not None:
        return "coefficients learned on the unlabeled eval inputs"
    sp = "LiNeS beta" if getattr(cand, "lines", None) is not None else get_method(cand.method).scale_param
    return f"{sp} = {p.scale:g}" if sp and p.scale is not None else "no scale"


def _report(spec: TuneSpec, results, expert_scores, win, backend, t_start) -> dict:
    from submerge.methods import get_method

    cand = spec.candidates[win.index]
    m = get_method(cand.method)
    params = dict(cand.params)
    lines = None
    if cand.lines is not None:
        lines = dict(cand.lines)
        if win.best.scale is not None:
            lines["beta"] = win.best.scale
    elif m.scale_param and win.best.scale is not None and cand.learn is None:
        params[m.scale_param] = win.best.scale
    return {
        "format": "submerge-tune/1",
        "backend": backend,
        "objective": spec.objective,
        "tasks": [{"name": t.name, "data": str(t.data), "scorer": t.scorer, "expert": str(t.expert)}
                  for t in spec.tasks],
        "expert_scores": expert_scores,
        "candidates": [{**r.to_dict(), "method": spec.candidates[r.index].method,
                        "params": spec.candidates[r.index].params,
                        "learn": spec.candidates[r.index].learn, "evolve": spec.candidates[r.index].evolve,
                        "scale_param": spec.candidates[r.index].scale_param} for r in results],
        "winner": {"index": win.index, "label": win.label, "method": cand.method, "params": params, "lines": lines,
                   "learn": cand.learn, "learned": win.best.learned, "model_params": win.best.model_params,
                   "objective": win.best.objective, "scores": win.best.scores, "normalized": win.best.normalized},
        "errors": [r.error for r in results if r.error],
        "seconds_sweep": time.perf_counter() - t_start,
        "config": json.loads(json.dumps(spec.raw, default=str)),
    }


def _write(spec: TuneSpec, cand: Candidate, best: Point, stats: dict, out: Path, overwrite: bool, quiet: bool,
           inputs: list, report: dict, random_seed: int) -> None:
    from submerge.engine.config import first_layer
    from submerge.engine.executor import Executor, MergeOptions
    from submerge.engine.plan import plan_merge
    from submerge.methods import get_method
    from submerge.tune.report import append_card, write_markdown, write_plot

    m = get_method(cand.method)
    params = dict(report["winner"]["params"])
    folders = None
    coef = None
    if cand.learn is not None:  # learned AdaMerging: merge with its coefficients, saved beside the model
        from submerge.methods.adamerging import COEFFICIENTS_FILE, Coefficients

        coef = Coefficients.from_json(best.learned)
        scratch = Path(tempfile.mkdtemp(prefix="submerge-adamerging-"))
        params = {"coefficients": str(coef.save(scratch / COEFFICIENTS_FILE))}
    elif m.uses_stats(m.bind(params, [first_layer(dict(e.parameters) | (o or {})) for e, o in
                                      zip(spec.models, report["winner"].get("model_params") or [None] * 99)])):
        folders = dict(zip(spec.task_names, map(Path, stats[m.stats_kind])))
    cfg = spec.merge_config(cand.method, params, folders, lines=report["winner"].get("lines"),
                            overrides=report["winner"].get("model_params"))
    obj = {"mean": "mean normalised score", "worst": "worst task's normalised score",
           "weighted": "weighted normalised score"}[spec.objective["kind"]]
    note = (f"chosen by `submerge tune` on validation data: {obj} {best.objective:.4f} over "
            f"{len(report['candidates'])} candidate(s)")
    plan = plan_merge(cfg, None)
    ex = Executor(plan, MergeOptions(overwrite=overwrite, quiet=quiet, random_seed=random_seed, scale_note=note))

    def finish(tmp: Path) -> None:
        (tmp / "tune.json").write_text(json.dumps(report, indent=2, default=str))
        write_markdown(report, tmp / "tune.md")
        write_plot(report, tmp / "tune.png")
        append_card(report, tmp / "README.md")
        if coef is not None:
            # the coefficients beside the model, and the written config pointing at them (not at the scratch copy)
            coef.save(tmp / COEFFICIENTS_FILE)
            coef.heatmap(tmp / "adamerging.png")
            final = spec.merge_config(cand.method, {"coefficients": str(out.resolve() / COEFFICIENTS_FILE)})
            (tmp / "submerge_config.yaml").write_text(final.to_yaml())

    try:
        ex.run(out, inputs, finish=finish)
    finally:
        if coef is not None:
            shutil.rmtree(scratch, ignore_errors=True)
