"""What evaluates candidates: a :class:`SweepWorker` holds the base, the experts and each task's scorer once,
and runs one candidate at a time (its merges in memory, its scale search along the affine path).

The local backend runs one worker in the process; the Ray backend runs the same class as actors, each given the
tensors through the object store.  A worker never writes files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from submerge.errors import ConfigError, SubmergeError

log = logging.getLogger("submerge.tune")


@dataclass
class Point:
    scale: Optional[float]
    objective: float
    scores: dict[str, float]
    normalized: dict[str, float]
    details: dict[str, dict] = field(default_factory=dict)
    learned: Optional[dict] = None  # what a learned candidate learned (AdaMerging's coefficients, as saved)
    model_params: Optional[list[dict]] = None  # the per-model parameters a search set (a CMA-ES point)

    def to_dict(self) -> dict:
        out = {"scale": self.scale, "objective": self.objective, "scores": self.scores,
               "normalized": self.normalized, "details": self.details}
        if self.learned is not None:
            out["learned"] = self.learned
        if self.model_params is not None:
            out["model_params"] = self.model_params
        return out


@dataclass
class CandidateResult:
    index: int
    label: str
    points: list[Point] = field(default_factory=list)
    best: Optional[Point] = None
    seconds: float = 0.0
    error: Optional[str] = None
    strategy: Optional[str] = None

    def to_dict(self) -> dict:
        return {"index": self.index, "label": self.label, "seconds": self.seconds, "error": self.error,
                "strategy": self.strategy, "points": [p.to_dict() for p in self.points],
                "best": self.best.to_dict() if self.best else None}


def objective_value(normalized: dict[str, float], objective: dict) -> float:
    vals = list(normalized.values())
    if objective["kind"] == "worst":
        return float(min(vals))
    if objective["kind"] == "weighted":
        w = objective["weights"]
        return float(sum(w[k] * v for k, v in normalized.items()) / sum(w.values()))
    return float(sum(vals) / len(vals))


def best_point(points: Sequence[Point]) -> Point:
    """The highest objective; ties go to the smaller scale (as search_alpha), then the first evaluated."""
    return max(points, key=lambda p: (p.objective, -(p.scale if p.scale is not None else 0.0)))


class CandidateError(SubmergeError):
    """A candidate failed (its scorer raised, or its merge did): the message names the candidate (one line when
    it ends the run, as when an expert itself cannot be scored)."""


class SweepWorker:
    """Scores merged state dicts on every task.  ``base`` / ``experts``: state dicts (tensor name -> tensor) of
    the merged tensors; ``tasks``: :class:`~submerge.evaluate.scorers.TaskData` (one per expert);
    ``stats``: per statistics kind, one source per expert (folders or objects)."""

    def __init__(self, base: Optional[dict], experts: list[dict], tasks: list, objective: dict,
                 stats: Optional[dict[str, list]] = None, model_params: Optional[list[dict]] = None,
                 random_seed: int = 0, threads: Optional[int] = None):
        from submerge.evaluate.registry import make_scorer

        if threads:
            torch.set_num_threads(threads)
        self.base, self.experts, self.tasks = base, experts, tasks
        self.objective = objective
        self.stats = stats or {}
        self.model_params = model_params or [{} for _ in experts]
        self.random_seed = random_seed
        self.scorers = [make_scorer(t) for t in tasks]
        self.expert_scores: Optional[dict[str, float]] = None
        self._models: dict[tuple, torch.nn.Module] = {}
        self._merged_names = set(experts[0])

    # ------------------------------------------------------------------ models
    def _model(self, i: int) -> torch.nn.Module:
        """The architecture that scores task ``i`` (one per model class and expert config, shared by tasks)."""
        from submerge.io.files import read_small_text
        from submerge.io.pretrained import load_pretrained

        sc, task = self.scorers[i], self.tasks[i]
        cfg_file = Path(task.expert) / "config.json"
        cfg = json.loads(read_small_text(cfg_file, cfg_file.parent, f"task {task.name}")) \
            if os.path.lexists(cfg_file) else {}
        sig = {k: v for k, v in cfg.items() if k not in ("id2label", "label2id", "_name_or_path")}
        key = (sc.model_class, json.dumps(sig, sort_keys=True, default=str))
        if key not in self._models:
            import transformers

            cls = getattr(transformers, sc.model_class, None)
            if cls is None:
                raise ConfigError(f"task {task.name}: model_class {sc.model_class!r} is not a transformers class")
            model = load_pretrained(cls, Path(task.expert), quiet=True).eval()
            own = set(model.state_dict())
            stray = sorted(self._merged_names - own)
            if stray:
                raise ConfigError(f"task {task.name}: {len(stray)} merged tensor(s) are not in {sc.model_class} "
                                  f"loaded from {task.expert}, e.g. {stray[:3]} (tensor names of another "
                                  f"architecture?)")
            self._models[key] = model
        return self._models[key]

    def _score_state(self, state: dict[str, torch.Tensor], label: str,
                     own_from: Optional[int] = None) -> tuple[dict[str, float], dict[str, dict]]:
        """Every task's score of ``state`` (with each task's own tensors, e.g. its head, swapped in);
        ``own_from``: score only that expert's own task (the normalisation pass)."""
        scores, details = {}, {}
        for i, model in self.each_task(state, own_from):
            task, sc = self.tasks[i], self.scorers[i]
            task.candidate = label
            try:
                value, det = sc.score(model)
            except Exception as e:
                where = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()[-1]
                raise CandidateError(f"candidate {label}: the {task.scorer} scorer of task {task.name} raised "
                                     f"{where}") from e
            if not math.isfinite(value):
                raise CandidateError(f"candidate {label}: task {task.name} scored {value}")
            scores[task.name], details[task.name] = value, det
        return scores, details

    def each_task(self, state: dict[str, torch.Tensor], only: Optional[int] = None):
        """Per task ``i`` (or only task ``only``): ``(i, model)``, the task's architecture holding ``state`` with
        the task's own tensors (its classifier) swapped in — what its scorer reads."""
        loaded: set = set()
        for i in (range(len(self.tasks)) if only is None else [only]):
            model = self._model(i)
            if id(model) not in loaded:
                model.load_state_dict(state, strict=False)
                loaded.add(id(model))
            own = self.scorers[i].own_tensors(model, self.experts[i])
            if own:
                model.load_state_dict(own, strict=False)
                loaded.discard(id(model))  # the next task of this model reloads the merged tensors
            yield i, model

    def score_experts(self) -> dict[str, float]:
        """Each expert on its own task: the normalisation of every score (computed once)."""
        if self.expert_scores is None:
            out = {}
            for i, t in enumerate(self.tasks):
                s, _ = self._score_state(self.experts[i], f"expert {t.name}", own_from=i)
                out[t.name] = s[t.name]
            self.expert_scores = out
        return self.expert_scores

    def set_expert_scores(self, scores: dict[str, float]) -> None:
        self.expert_scores = dict(scores)

    def _point(self, state: dict, scale: Optional[float], label: str) -> Point:
        scores, details = self._score_state(state, label)
        ref = self.score_experts()
        norm = {k: v / max(ref[k], 1e-12) for k, v in scores.items()}
        return Point(scale, objective_value(norm, self.objective), scores, norm, details)

    # ------------------------------------------------------------------ candidates
    def run(self, cand) -> CandidateResult:
        """One candidate: merge(s) in memory, then its scale search; errors are returned, not raised."""
        t0 = time.perf_counter()
        res = CandidateResult(cand.index, cand.label)
        try:
            self._run(cand, res)
        except CandidateError as e:
            res.error = str(e)
        except Exception as e:  # a merge that fails on these tensors: named, the sweep goes on
            res.error = f"candidate {cand.label}: {type(e).__name__}: {e}"
        res.seconds = time.perf_counter() - t0
        if res.points and res.error is None:
            res.best = best_point(res.points)
        return res

    def _run(self, cand, res: CandidateResult) -> None:
        from submerge.engine.config import first_layer
        from submerge.engine.memory import merge_state_dicts_many
        from submerge.methods import get_method
        from submerge.search import affine_path, auto_search_kwargs, search_alpha

        if getattr(cand, "learn", None) is not None:
            self._run_adamerging(cand, res)
            return
        m = get_method(cand.method)
        mp = [dict(p) for p in self.model_params]
        set_by_search = getattr(cand, "model_params", None)
        if set_by_search is not None:  # one point of a search over per-model parameters (CMA-ES)
            mp = [{**p, **q} for p, q in zip(mp, set_by_search)]
        stats = None
        if m.uses_stats(m.bind(cand.params, [first_layer(p) for p in mp])):
            stats = self.stats.get(m.stats_kind)
        kw = dict(stats=stats, random_seed=self.random_seed)
        lines = getattr(cand, "lines", None)
        if lines is not None:
            self._run_lines(cand, res, lines, mp, kw)
            return
        if cand.scale is None:
            state = merge_state_dicts_many(cand.method, self.base, self.experts, [cand.params], mp, **kw)[0]
            res.points.append(self._point(state, cand.params.get(m.scale_param) if m.scale_param else None,
                                          cand.label))
            res.points[-1].model_params = set_by_search
            return
        if cand.scale == "auto":
            def score_fn(state):
                p = self._point(state, None, cand.label)
                pending.append(p)
                return p.objective

            pending: list[Point] = []
            opts = auto_search_kwargs(m) if cand.strategy == "auto" else {"strategy": cand.strategy}
            found = search_alpha(cand.method, self.base, self.experts, score_fn, cand.params, mp, **kw, **opts)
            # search_alpha scores its points in order; pair them with the scales it reports
            for a, p in zip(found.eval_order, pending):
                p.scale = a
            res.points.extend(sorted(pending, key=lambda p: p.scale))
            res.strategy = found.strategy
            return
        path = affine_path(cand.method, self.base, self.experts, cand.params, mp, **kw)
        for a in cand.scale:
            res.points.append(self._point(path(float(a)), float(a), cand.label))
        res.strategy = "list"

    def _run_adamerging(self, cand, res: CandidateResult) -> None:
        """AdaMerging learned here: coefficients by entropy minimisation on each task's eval texts (labels
        unused), through each task's own head (its classifier, or the embedding head at its logit scale),
        then the merge scored like any candidate.  One point; the coefficients travel with it."""
        from submerge.methods.adamerging import learn, merge_with

        s = cand.learn
        model = self._model(0)
        if any(self._model(i) is not model for i in range(1, len(self.tasks))):
            raise CandidateError(f"candidate {cand.label}: adamerging needs every task on one architecture; the "
                                 f"experts' configs or scorers' model classes differ")
        inputs = [sc.unlabeled_batches(s["batch_size"]) for sc in self.scorers]
        own = [sc.own_tensors(model, e) for sc, e in zip(self.scorers, self.experts)]
        names = [k for k, v in self.base.items() if v.is_floating_point()]

        coef = learn(model, self.base, self.experts, inputs,
                     lambda forward, t, batch: self.scorers[t].task_logits(forward, batch), tasks=[t.name for t in self.tasks], names=names,
                     granularity=s["granularity"], init=s["init"], steps=s["steps"], lr=s["lr"], ties=s["plus"],
                     seed=self.random_seed, task_params=own,
                     **({"ties_density": s["ties_density"]} if s["plus"] else {}))
        state = merge_with(self.base, self.experts, coef)
        p = self._point(state, None, cand.label)
        p.learned = coef.to_json()
        res.points.append(p)
        res.strategy = "learned"

    def _run_lines(self, cand, res: CandidateResult, lines: dict, mp: list, kw: dict) -> None:
        """A candidate with LiNeS: beta fixed (one merge), a list (along the affine path in beta: the merge is
        affine in beta, alpha auto or fixed not depending on it) or auto (search_alpha's beta search)."""
        from submerge.engine.memory import merge_state_dicts_many
        from submerge.search import AffinePath, search_alpha

        fixed = {k: v for k, v in lines.items() if k != "beta"}
        if cand.scale is None:
            state = merge_state_dicts_many(cand.method, self.base, self.experts, [cand.params], mp, lines=lines,
                                           **kw)[0]
            res.points.append(self._point(state, None, cand.label))
            return
        if cand.scale == "auto":
            pending: list[Point] = []

            def score_fn(state):
                p = self._point(state, None, cand.label)
                pending.append(p)
                return p.objective

            found = search_alpha(cand.method, self.base, self.experts, score_fn, cand.params, mp,
                                 lines=fixed or True, **kw)
            for a, p in zip(found.eval_order, pending):
                p.scale = a
            res.points.extend(sorted(pending, key=lambda p: p.scale))
            res.strategy = found.strategy
            return
        at0, at1 = (merge_state_dicts_many(cand.method, self.base, self.experts, [cand.params], mp,
                                           lines={**fixed, "beta": b}, **kw)[0] for b in (0.0, 1.0))
        path = AffinePath(at0, at1)
        del at0, at1
        for b in cand.scale:
            res.points.append(self._point(path(float(b)), float(b), cand.label))
        res.strategy = "list"
