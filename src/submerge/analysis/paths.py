"""Measurements that need a scorer: loss and score along paths between models, barrier heights, the merge's
retention per task, and calibration (expected calibration error, reliability diagrams).

A task's scorer is ``submerge tune``'s (:mod:`submerge.evaluate.scorers`), run on the validation data of the
config's ``eval:`` block:

* ``classification`` — loss is the cross-entropy of the logits, score the accuracy; probabilities give the
  calibration.  A frozen embedding head (the benchmark's) yields cosine similarities with no temperature of
  their own: each task's logit scale is fitted on its expert (minimum NLL over a log grid of 0.1–1000, on
  the task's validation data) and the same scale is used for every model scored on that task, so the
  experts' ECE is after temperature scaling and the others' is relative to it.  A classifier's logits are
  used as they are (scale 1).
* ``lm_loss`` — loss is the mean token NLL, score ``exp(−NLL)``; no calibration.
* ``python:`` — score only (barriers on the score; no loss, no calibration).

Paths (``points`` evenly spaced values of t, endpoints included): base → each expert and each expert → the
merge (linear, scored on the expert's task), and between every pair of experts (linear and SLERP per
tensor, scored on both tasks).  The barrier of a path on a task is ``max_t [L(t) − ((1 − t) L(0) + t L(1))]``
(Frankle et al. 2020; the survey's mode connectivity), and the score barrier the same on the score with the
sign turned (the drop below the endpoints' line).  ECE uses 15 equal-width confidence bins.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

ECE_BINS = 15


def interpolate(a: dict, b: dict, t: float, kind: str = "linear") -> dict:
    """The state dict at ``t`` on the path from ``a`` (t = 0) to ``b`` (t = 1); non-floating tensors from ``a``."""
    from submerge.methods.slerp import slerp

    out = {}
    for k, x in a.items():
        y = b[k]
        if not x.is_floating_point():
            out[k] = x
        elif kind == "slerp":
            out[k] = slerp(t, x.float(), y.float()).to(x.dtype)
        else:
            out[k] = torch.lerp(x.float(), y.float(), t).to(x.dtype)
    return out


def barrier(values: Sequence[float], ts: Sequence[float], higher_is_better: bool = False) -> float:
    """Largest excess of ``values`` over the straight line between the endpoints (loss), or shortfall below it
    (a score with ``higher_is_better``); 0 when no interior point is worse than the line."""
    v0, v1 = values[0], values[-1]
    sign = -1.0 if higher_is_better else 1.0
    gaps = [sign * (v - ((1 - t) * v0 + t * v1)) for v, t in zip(values, ts)]
    return max(0.0, max(gaps))


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """Expected calibration error of the top-class confidence, and the reliability diagram's bins."""
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=conf.dtype)
    idx = torch.bucketize(conf, edges[1:-1], right=True)
    n = len(labels)
    count = torch.bincount(idx, minlength=bins).double()
    conf_sum = torch.bincount(idx, weights=conf.double(), minlength=bins)
    acc_sum = torch.bincount(idx, weights=correct, minlength=bins)
    err = float((conf_sum - acc_sum).abs().sum() / max(n, 1))
    diagram = [{"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(count[b]),
                "confidence": float(conf_sum[b] / count[b]) if count[b] else None,
                "accuracy": float(acc_sum[b] / count[b]) if count[b] else None} for b in range(bins)]
    return err, diagram


def fit_scale(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The logit scale (temperature⁻¹) minimising the NLL, on a log grid over 0.1–1000 (401 points)."""
    grid = torch.logspace(-1, 3, 401, dtype=torch.float64)
    z = logits.double()
    nll = torch.stack([torch.nn.functional.cross_entropy(s * z, labels) for s in grid])
    return float(grid[int(nll.argmin())])


class Evaluator:
    """Scores state dicts task by task through a :class:`~submerge.evaluate.worker.SweepWorker`, caching results by
    (model label, task); keeps what the paths, retention and calibration need."""

    def __init__(self, worker):
        from submerge.evaluate.scorers import ClassificationScorer, LMLossScorer

        self.worker = worker
        self.names = [t.name for t in worker.tasks]
        self.kind = ["classification" if isinstance(s, ClassificationScorer) else
                     "lm_loss" if isinstance(s, LMLossScorer) else "python" for s in worker.scorers]
        self.scales: dict[int, float] = {}
        self.cache: dict[tuple[str, int], dict] = {}
        self.evaluations = 0

    def _scale(self, i: int) -> float:
        if i not in self.scales:
            sc = self.worker.scorers[i]
            if self.kind[i] != "classification" or not sc.embedding_head:
                self.scales[i] = 1.0
            else:
                _, model = next(self.worker.each_task(self.worker.experts[i], i))
                self.scales[i] = fit_scale(sc.logits(model), sc.data[1])
        return self.scales[i]

    def evaluate(self, label: str, state: dict, tasks: Optional[Sequence[int]] = None) -> dict[int, dict]:
        todo = [i for i in (range(len(self.names)) if tasks is None else tasks) if (label, i) not in self.cache]
        for i in todo:
            self._scale(i)  # before the state is loaded: fitting it loads the expert
            _, model = next(self.worker.each_task(state, i))
            sc = self.worker.scorers[i]
            if self.kind[i] == "classification":
                z = sc.logits(model) * self.scales[i]
                y = sc.data[1]
                probs = torch.softmax(z.double(), -1)
                rec = {"score": float((z.argmax(-1) == y).double().mean()),
                       "loss": float(torch.nn.functional.cross_entropy(z.double(), y)), "probs": probs, "labels": y}
            elif self.kind[i] == "lm_loss":
                nll, _ = sc.nll(model)
                rec = {"score": math.exp(-nll), "loss": nll}
            else:
                value, _ = sc.score(model)
                rec = {"score": float(value), "loss": None}
            self.cache[(label, i)] = rec
            self.evaluations += 1
        return {i: self.cache[(label, i)] for i in (range(len(self.names)) if tasks is None else tasks)}


def path_record(ev: Evaluator, start: tuple[str, dict], end: tuple[str, dict], tasks: Sequence[int],
                ts: Sequence[float], kind: str = "linear") -> dict:
    """Loss and score of ``tasks`` along one path, with barrier heights."""
    (la, a), (lb, b) = start, end
    curves = {ev.names[i]: {"loss": [], "score": []} for i in tasks}
    for t in ts:
        if t == 0:
            res = ev.evaluate(la, a, tasks)
        elif t == 1:
            res = ev.evaluate(lb, b, tasks)
        else:
            label = f"{kind}:{la}->{lb}@{t:.4g}"
            res = ev.evaluate(label, interpolate(a, b, t, kind), tasks)
            for i in tasks:  # interior points are not reused: keep the cache small
                ev.cache.pop((label, i), None)
        for i in tasks:
            curves[ev.names[i]]["loss"].append(res[i]["loss"])
            curves[ev.names[i]]["score"].append(res[i]["score"])
    out = {"from": la, "to": lb, "kind": kind, "t": list(ts), "tasks": {}}
    for name, c in curves.items():
        has_loss = all(v is not None for v in c["loss"])
        out["tasks"][name] = {**c, "loss_barrier": barrier(c["loss"], ts) if has_loss else None,
                              "score_barrier": barrier(c["score"], ts, higher_is_better=True)}
    return out


def analyze_paths(ev: Evaluator, base: dict, experts: Sequence[dict], merged: dict, *, points: int = 5,
                  pairs: bool = True, progress=None) -> dict:
    """Every path, the merge's retention per task, and calibration of base, experts and merge."""
    ts = [i / (points - 1) for i in range(points)]
    names = ev.names
    out: dict = {"t": ts, "base_to_expert": [], "expert_to_merge": [], "pairs": []}
    step = progress or (lambda *_: None)
    for i, e in enumerate(experts):
        step(f"path base -> {names[i]}")
        out["base_to_expert"].append(path_record(ev, ("base", base), (f"expert:{names[i]}", e), [i], ts))
        step(f"path {names[i]} -> merge")
        out["expert_to_merge"].append(path_record(ev, (f"expert:{names[i]}", e), ("merge", merged), [i], ts))
    if pairs:
        for i in range(len(experts)):
            for j in range(i + 1, len(experts)):
                for kind in ("linear", "slerp"):
                    step(f"path {names[i]} <-> {names[j]} ({kind})")
                    out["pairs"].append(path_record(ev, (f"expert:{names[i]}", experts[i]),
                                                    (f"expert:{names[j]}", experts[j]), [i, j], ts, kind))
    own = {names[i]: ev.evaluate(f"expert:{names[i]}", e, [i])[i]["score"] for i, e in enumerate(experts)}
    merged_res = ev.evaluate("merge", merged)
    base_res = ev.evaluate("base", base)
    out["retention"] = {names[i]: merged_res[i]["score"] / own[names[i]] if own[names[i]] else None
                        for i in range(len(names))}
    vals = [v for v in out["retention"].values() if v is not None]
    out["mean_retention"] = sum(vals) / len(vals) if vals else None
    out["scores"] = {"expert": own, "merge": {names[i]: r["score"] for i, r in merged_res.items()},
                     "base": {names[i]: r["score"] for i, r in base_res.items()}}
    cal = {}
    for i, name in enumerate(names):
        if ev.kind[i] != "classification":
            continue
        row = {"logit_scale": ev.scales.get(i, 1.0)}
        for who, res in (("expert", ev.evaluate(f"expert:{name}", experts[i], [i])[i]), ("merge", merged_res[i]),
                         ("base", base_res[i])):
            e, diagram = ece(res["probs"], res["labels"])
            row[who] = {"ece": e, "accuracy": res["score"], "nll": res["loss"], "bins": diagram}
        cal[name] = row
    out["calibration"] = cal
    if cal:
        out["mean_ece"] = {who: sum(r[who]["ece"] for r in cal.values()) / len(cal) for who in ("expert", "merge", "base")}
    out["evaluations"] = ev.evaluations
    return out
