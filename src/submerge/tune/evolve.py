"""``strategy: cma`` in ``submerge tune``: CMA-ES (the maintained ``cmaes`` package) over mergekit-evolve's genome,
each model's merge parameters (weight, density, ...) within their bounds, each either one value per model or
``layer_points`` values interpolated over the layers (a gradient, as a config's lists).

Every generation's points are merged in memory and scored by the tune scorers like any candidate, spread over
the backend's workers (Ray actors on ``--backend ray``).  The budget is ``evaluations`` points (whole
generations: at least one) and, if given, ``time`` seconds (checked between generations).  The optimiser and
every point are saved after each generation in the tune cache, so a stopped run resumes where it was and a
finished one is read back; every evaluated point is reported in ``tune.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pickle
import time
from pathlib import Path
from typing import Callable, Optional

from submerge.evaluate.worker import CandidateResult, best_point

FAILED = 1e6  # the value CMA-ES is told for a point whose merge or scoring failed (it minimises)


def dimension(cand) -> tuple[int, int]:
    """(genome parameters, layer points) of a CMA candidate."""
    return len(cand.evolve["genome"]), cand.evolve["layer_points"]


def genome_params(x, genome: dict, n_models: int, points: int) -> list[dict]:
    """A point of the unit cube as per-model parameters: model-major, then the genome's parameters in order,
    then the layer points (one value per model when ``points`` is 1)."""
    out, k = [], 0
    for _ in range(n_models):
        d = {}
        for name, (lo, hi) in genome.items():
            vals = [lo + min(1.0, max(0.0, float(x[k + j]))) * (hi - lo) for j in range(points)]
            k += points
            d[name] = vals[0] if points == 1 else vals
        out.append(d)
    return out


def state_key(raw_config: dict, cand, seed: int, fingerprints: list[str]) -> str:
    """What a saved search is keyed by: the whole tune config, the candidate, the seed and the experts' contents."""
    blob = json.dumps({"config": raw_config, "index": cand.index, "label": cand.label, "seed": seed,
                       "experts": fingerprints}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def run_cma(runner, cand, n_models: int, seed: int, state_path: Optional[Path],
            say: Callable[[str], None] = lambda s: None) -> CandidateResult:
    import numpy as np
    from cmaes import CMA

    s = cand.evolve
    n_params, points = dimension(cand)
    dim = n_models * n_params * points
    t0 = time.perf_counter()
    saved = None
    if state_path is not None and state_path.is_file():
        with open(state_path, "rb") as f:
            saved = pickle.load(f)  # noqa: S301 - written by this function into the user's own cache
    if saved is not None:
        opt, evaluated, errors, spent = saved["optimizer"], saved["points"], saved["errors"], saved["seconds"]
        say(f"  {cand.label}: resumed after {len(evaluated)} point(s) ({saved['generations']} generation(s))")
    else:
        opt = CMA(mean=np.full(dim, 0.5), sigma=float(s["sigma"]), bounds=np.tile([0.0, 1.0], (dim, 1)), seed=seed,
                  population_size=s["population"])
        evaluated, errors, spent = [], [], 0.0
    generations = saved["generations"] if saved is not None else 0
    limit = max(1, s["evaluations"] // opt.population_size) * opt.population_size

    while len(evaluated) + len(errors) < limit:
        if s["time"] is not None and spent + time.perf_counter() - t0 >= s["time"] and evaluated:
            say(f"  {cand.label}: time budget of {s['time']:g}s reached")
            break
        xs = [opt.ask() for _ in range(opt.population_size)]
        subs = [dataclasses.replace(cand, index=j, evolve=None,
                                    model_params=genome_params(x, s["genome"], n_models, points))
                for j, x in enumerate(xs)]
        got: dict[int, CandidateResult] = {}
        runner.run(subs, lambda r: got.__setitem__(r.index, r))
        told = []
        for j, x in enumerate(xs):
            r = got[j]
            if r.error is not None or r.best is None:
                errors.append(r.error or "no score")
                told.append((x, FAILED))
                continue
            p = r.best
            p.model_params = subs[j].model_params
            evaluated.append(p)
            told.append((x, -p.objective if math.isfinite(p.objective) else FAILED))
        opt.tell(told)
        generations += 1
        if state_path is not None:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = state_path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                pickle.dump({"optimizer": opt, "points": evaluated, "errors": errors, "generations": generations,
                             "seconds": spent + time.perf_counter() - t0}, f)
            tmp.replace(state_path)
        if evaluated:
            say(f"  {cand.label}: generation {generations}, {len(evaluated)} point(s), best objective "
                f"{max(p.objective for p in evaluated):.4f}")
    res = CandidateResult(cand.index, cand.label, points=list(evaluated), strategy="cma",
                          seconds=spent + time.perf_counter() - t0)
    if evaluated:
        res.best = best_point(evaluated)
    else:
        res.error = f"candidate {cand.label}: every CMA-ES point failed ({errors[0] if errors else 'none ran'})"
    return res
