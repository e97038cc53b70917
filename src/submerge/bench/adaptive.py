"""The rows of methods that are more than one static merge, chosen by what each declares (``evaluation`` in the
registry): routed experts on a static merge (ESM++), per-task models with the task id (TALL masks), coefficients
learned on unlabeled inputs (AdaMerging), and Representation Surgery after a merge (``<method>+surgery``).
"""

from __future__ import annotations

import contextlib
import time
from typing import Optional

import numpy as np
import torch

from submerge.bench.presets import search_kwargs
from submerge.bench.session import BenchSession
from submerge.errors import ConfigError
from submerge.methods import get_method


def esmpp_rows(S: BenchSession, host: str, found, stats, test_correct: dict, static=None, partial=None) -> list[dict]:
    """ESM++ rows: experts of rank r on the val-tuned merge of ``host`` (ESM; ``found``: its search if done),
    routed (and, at the largest r, oracle, routed per token when the suite asks — ``cfg.esmpp_per_token`` — and
    each linear router), with routing accuracy and the inference time against the static model (``static``: its
    test scores and seconds when the ESM row already measured them).  ``partial``: rows an earlier, stopped run
    finished (reused, not scored again) and where each new row is kept as soon as it is scored."""
    from submerge.routing import build_experts
    from submerge.search import search_alpha

    rows = []
    ready: dict = {}  # the host's val-tuned merge and its static test scoring, made when a row needs them

    def host_merge():
        if "found" not in ready:
            f, st = found, static
            if f is None:
                f = search_alpha(host, S.base, S.experts, S.val_score, {}, stats=stats, random_seed=S.cfg.seed,
                                 **search_kwargs(S.cfg, get_method(host)))
                st = None
            if st is None:
                t0 = time.perf_counter()
                res0 = S.evaluate(f.state, "test")
                st = (res0, time.perf_counter() - t0)
            ready["found"], ready["static"] = f, st
        return ready["found"], ready["static"]

    for r in S.cfg.esmpp_ranks:
        # the cosine rule, the task-id upper bound, (largest rank) per token, then each linear router in turn
        largest = r == max(S.cfg.esmpp_ranks)
        per_token = largest and getattr(S.cfg, "esmpp_per_token", False)
        variants = [("route", None, False)] + ([("oracle", None, False)] if largest else []) \
            + ([("route", None, True)] if per_token else []) \
            + ([("route", k, False) for k in S.cfg.esmpp_routers] if largest else [])
        experts = None
        for mode, kind, token in variants:
            how = "oracle task id" if mode == "oracle" else "routed" + (" per token" if token else "") \
                + (f", {kind} router" if kind else "")
            label = f"esm_pp r={r} ({how})"
            kept = partial.get(label) if partial is not None else None
            if kept is not None:
                rows.append({**kept[0], "kept": True})
                test_correct[label] = kept[1]
                S.say(f"{label:34s} kept from an earlier, stopped run")
                continue
            f, (static_res, static_s) = host_merge()
            if experts is None:
                t0 = time.perf_counter()
                experts = build_experts(f.state, S.experts, stats, rank=r, tasks=S.names)
                build_s = time.perf_counter() - t0
                ov = experts.overhead(sum(v.numel() for v in S.base.values()))
            router_s = _add_router(S, f, experts, stats, kind) if kind else 0.0
            res, report, secs = S.evaluate_routed(f.state, experts, "test", mode,
                                                  **({"per_token": True} if token else {}))
            params = {"rank": r, "alpha": f.alpha, **({"router": kind} if kind else {}),
                      **({"per_token": True} if token else {})}
            setting = f"r={r}, {mode}" + (", per token" if token else "") + (f", {kind} router" if kind else "")
            row, _ = S.test_row("esm_pp", setting, params, f.state, f.alpha, build_s + router_s,
                                label=label, res=res, reference="oracle" if mode == "oracle" else None)
            n_test = sum(len(v) for v in static_res.values())
            row["overhead"] = ov
            row["ms_per_example"] = 1000 * secs / n_test
            row["static_ms_per_example"] = 1000 * static_s / n_test
            if report is not None:
                row["routing"] = report.to_dict()
            test_correct[label] = res
            rows.append(row)
            if partial is not None:
                partial.put(row, res)
            S.say(f"{label:34s} norm {100 * row['avg_norm']:.1f}"
                  + (f"  routing acc {report.accuracy:.3f}" if report is not None else "")
                  + f"  {row['ms_per_example']:.2f} ms/example (static {row['static_ms_per_example']:.2f})")
    return rows


def _add_router(S: BenchSession, found, experts, stats, kind: str) -> float:
    """Give ``experts`` a linear router (``gaussian``: from the calibration statistics; ``trained``: on each
    task's calibration inputs run through the static merge) in place of the cosine rule; returns seconds."""
    from submerge.routing.routers import gaussian_router, train_router

    t0 = time.perf_counter()
    if kind == "gaussian":
        gaussian_router(experts, stats)
    elif kind == "trained":
        batches = [[dict(S.bb.tokenize(S.sample(t.name, S.cfg.calib_split, S.cfg.calib_n)[0]))] for t in S.tasks]
        S.bb.load(found.state)
        try:
            train_router(S.bb.model, experts, batches)
        finally:
            S.bb.reset()
    else:
        raise ConfigError(f"unknown ESM++ router {kind!r}; use gaussian or trained")
    return time.perf_counter() - t0

# TALL-mask thresholds the authors try per task (chosen on that task's validation accuracy)
TALL_GRID = (0.2, 0.3, 0.4, 0.5, 0.6)


class _TallTask:
    """Task ``i``'s TALL models ``θ_0 + m_i ⊙ τ_MTL`` for any threshold λ, ``m_i = |τ_i| > λ |τ_MTL − τ_i|``
    (as :func:`submerge.methods.consensus.tall_masks`, bit for bit): both magnitudes are computed once per task,
    not once per threshold, and each state is written into one set of reused buffers (score it, do not keep it);
    the scaled gap and the mask live in scratch buffers of the largest tensor's size, not a model's."""

    def __init__(self, S: BenchSession, tau: dict, mtl: dict, i: int):
        self.S, self.mtl = S, mtl
        self.mag, self.gap = {}, {}
        for n, b in S.base.items():
            d = S.experts[i][n].float() - b.float()
            self.gap[n] = torch.sub(tau[n], d).abs_()
            self.mag[n] = d.abs_()
        largest = max(g.numel() for g in self.gap.values())
        self._scaled = torch.empty(largest, dtype=next(iter(self.gap.values())).dtype)
        self._keep = torch.empty(largest, dtype=torch.bool)
        self._out = {n: torch.empty_like(b) for n, b in S.base.items()}

    def state(self, lam: float) -> dict:
        for n, b in self.S.base.items():
            g = self.gap[n]
            scaled, keep = self._scaled[:g.numel()].view(g.shape), self._keep[:g.numel()].view(g.shape)
            torch.mul(g, float(torch.tensor(lam, dtype=g.dtype)), out=scaled)
            torch.gt(self.mag[n], scaled, out=keep)
            self._out[n].copy_(torch.where(keep, self.mtl[n], b.float()))
        return self._out

def tall_lambdas(S: BenchSession, params: dict) -> tuple[list[float], dict, dict]:
    """Per task, the TALL threshold on TALL_GRID whose task model ``θ_0 + m_t ⊙ τ_MTL`` scores best on that
    task's validation split (ties: the smaller), as the authors; ``τ_MTL`` the sum of the task vectors, or their
    TIES merge (disjoint sum) when ``params`` has a ``density``.  Returns the thresholds, ``τ_MTL`` and
    ``θ_0 + τ_MTL``."""
    from submerge.methods.consensus import multitask_vector

    density = params.get("density")
    tau, mtl = {}, {}
    for n, b in S.base.items():
        deltas = torch.stack([e[n].float() - b.float() for e in S.experts])
        tau[n] = multitask_vector(deltas, [1.0] * len(S.experts), None if density is None else [density] * len(S.experts))
        mtl[n] = b.float() + tau[n]
    chosen = []
    for i in range(len(S.tasks)):
        task = _TallTask(S, tau, mtl, i)
        scores = {lam: float(S.task_correct(task.state(lam), i, "val").mean()) for lam in TALL_GRID}
        chosen.append(max(scores, key=lambda lam: (scores[lam], -lam)))
        del task  # four model-sized buffers: gone before the next task's are made
    return chosen, tau, mtl

def tall_rows(S: BenchSession, params: dict, test_correct: dict, t0: float) -> tuple[list[dict], dict]:
    """TALL masks (compression with the task id): each task scored with its own masked model
    ``θ_0 + m_t ⊙ τ_MTL`` on its own test split; thresholds per task on val.  An oracle row (needs the task id)."""
    lambdas, tau, mtl = tall_lambdas(S, params)
    seconds = time.perf_counter() - t0
    res = {t.name: S.task_correct(_TallTask(S, tau, mtl, i).state(lam), i, "test")
           for i, (t, lam) in enumerate(zip(S.tasks, lambdas))}
    label = "tall_masks (task id)"
    row, _ = S.test_row("tall_masks", "task id", {**params, "tall_lambda": dict(zip(S.names, lambdas))}, {}, None,
                        seconds, label=label, res=res, reference="oracle")
    n_params = sum(v.numel() for v in S.base.values())
    elem = next(iter(S.base.values())).element_size()
    row["storage"] = {"model_bytes": n_params * elem, "masks_bytes": len(S.tasks) * ((n_params + 7) // 8),
                      "experts_bytes": S.experts_bytes()}
    test_correct[label] = res
    S.say(f"{label:34s} norm {100 * row['avg_norm']:.1f}  thresholds "
          + ", ".join(f"{lam:g}" for lam in lambdas))
    return [row], test_correct


def surgery_rows(S: BenchSession, method: str, params: dict, stats, test_correct: dict, t0: float,
                 alpha: Optional[float] = None) -> tuple[list[dict], dict]:
    """Representation Surgery on ``method``'s val-tuned merge: per task a rank-16 module trained (Adam, L1, the
    paper's setting) to pull the merge's token representations (``S.representations``: an encoder's output, a
    decoder's last hidden states) towards the expert's on the task's *unlabeled val* inputs; scored with the
    task id (a reference row, as TALL masks) and routed by prototypes (a chat model's from its prompt only).
    ``alpha``: the val-tuned scale when ``method``'s own row found it already (this run or a kept row): the
    merge is rebuilt at it, as the search built it, instead of searching again."""
    from submerge.routing.surgery import attach_surgery, fit_surgery
    from submerge.search import affine_path, search_alpha

    m = get_method(method)
    if alpha is None:
        found = search_alpha(method, S.base, S.experts, S.val_score, params, stats=stats, random_seed=S.cfg.seed,
                             **search_kwargs(S.cfg, m))
        alpha, state = found.alpha, found.state
    else:  # the state the search returned at that scale
        state = affine_path(method, S.base, S.experts, params, stats=stats, random_seed=S.cfg.seed)(alpha, copy=True)
    batches = S.unlabeled_batches()
    with S.loaded(state):
        merged = [S.representations(b) for b in batches]
    targets = []
    for i, b in enumerate(batches):
        with S.loaded(S.experts[i]):
            targets.append(S.representations(b))
    surgery = fit_surgery(merged, targets, tasks=S.names, rank=16, steps=500, lr=1e-3, seed=S.cfg.seed)
    del merged, targets
    seconds = time.perf_counter() - t0
    chosen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(S.tasks))}
    with S.loaded(state) as model:
        handle = attach_surgery(model, surgery)

        @contextlib.contextmanager
        def recorded(i: int):
            n0 = len(handle.routed)
            yield
            chosen[i] += handle.routed[n0:]

        try:
            res_task = S.score_each("test", handle.task)
            res_route = S.score_each("test", recorded, router=handle)
        finally:
            handle.detach()
    route_acc = [float((torch.cat(chosen[i]) == i).float().mean()) if chosen[i] else float("nan")
                 for i in range(len(S.tasks))]
    p = {**params, m.scale_param: alpha, "surgery_rank": 16, "surgery_steps": 500,
         "l1_before_after": dict(zip(S.names, surgery.info["l1_before_after"]))}
    rows = []
    for setting, res, ref in (("task id", res_task, "oracle"), ("routed", res_route, None)):
        label = f"{method}+surgery ({setting})"
        row, _ = S.test_row(f"{method}+surgery", setting, p, state, alpha, seconds, label=label,
                            res=res, reference=ref)
        if setting == "routed":
            row["routing"] = {"accuracy": float(np.nanmean(route_acc)), "per_task": dict(zip(S.names, route_acc))}
        row["surgery_bytes"] = surgery.nbytes()
        test_correct[label] = res
        rows.append(row)
        S.say(f"{label:34s} norm {100 * row['avg_norm']:.1f}")
    return rows, test_correct

# AdaMerging rows: (label, granularity, AdaMerging++)
ADAMERGING_VARIANTS = (("adamerging (task-wise)", "task", False), ("adamerging (layer-wise)", "layer", False),
                       ("adamerging++ (layer-wise)", "layer", True))


def adamerging_rows(S: BenchSession, test_correct: dict) -> tuple[list[dict], dict]:
    """AdaMerging task-wise, layer-wise and AdaMerging++ layer-wise: coefficients learned by entropy minimisation
    on each task's *unlabeled validation* inputs (the session's ``unlabeled_batches``, visited in a seeded
    order), through the session's ``task_logits`` (the encoder suite: each task's frozen head; the LLM suite: the
    next-token distribution where the answer starts); then one test scoring per variant."""
    from submerge.methods.adamerging import learn, merge_with

    cfg = S.cfg
    inputs = S.unlabeled_batches()

    rows = []
    for label, granularity, ties in ADAMERGING_VARIANTS:
        t0 = time.perf_counter()
        coef = learn(S.model, S.base, S.experts, inputs, S.task_logits, tasks=S.names, names=list(S.base),
                     granularity=granularity, ties=ties, steps=cfg.adamerging_steps, lr=cfg.adamerging_lr,
                     seed=cfg.seed)
        S.reset()
        state = merge_with(S.base, S.experts, coef)
        params = {"granularity": granularity, "ties_density": coef.ties_density, "init": 0.3,
                  "steps": cfg.adamerging_steps, "lr": cfg.adamerging_lr,
                  "mean_coefficient": dict(zip(S.names, coef.values.mean(1).tolist()))}
        row, res = S.test_row("adamerging", label[label.index("(") + 1:-1] + (" ++" if ties else ""), params, state,
                              None, time.perf_counter() - t0, label=label)
        row["coefficients"] = {"tasks": coef.tasks, "names": coef.names, "values": coef.values.tolist(),
                               "entropy_first_last": [coef.history[0], coef.history[-1]]}
        test_correct[label] = res
        rows.append(row)
        S.say(f"{label:34s} norm {100 * row['avg_norm']:.1f}  entropy {coef.history[0]:.3f} -> "
              f"{coef.history[-1]:.3f}  ({time.perf_counter() - t0:.0f}s)")
    return rows, test_correct


def per_task_choice(param: str):
    """How a per-model parameter a method declares in ``per_task_params`` is chosen on each task's own
    validation split: ``chooser(S, params) -> (values per task, ...)``."""
    choosers = {"tall_lambda": tall_lambdas}
    if param not in choosers:
        raise ConfigError(f"the bench has no per-task rule for the parameter {param!r}; known: {sorted(choosers)}")
    return choosers[param]
