"""One method's bench rows: its scale searched on validation (default and val-tuned rows), each distinct model
scored on test once; methods that are not one static merge go to :mod:`submerge.bench.adaptive` by what they
declare.  The same function computes a row locally and on a Ray actor.
"""

from __future__ import annotations

import time
from typing import Optional

from submerge.api import merge_state_dicts
from submerge.bench.adaptive import adamerging_rows, esmpp_rows, per_task_choice, surgery_rows, tall_rows
from submerge.bench.presets import row_params, search_kwargs, split_row_name
from submerge.bench.session import BenchSession
from submerge.errors import ConfigError
from submerge.methods import get_method, list_methods


def method_rows(S: BenchSession, method: str, stats, searched: dict, partial=None
                ) -> Optional[tuple[list[dict], dict]]:
    """One method's rows and per-example test correctness: its scale searched on val (default and
    val-tuned rows), each distinct model scored on test once; None when the method does not apply.
    ``searched`` carries a search to the rows built on it (ESM's to ESM++'s, a scale to ``+surgery``);
    ``partial`` (:class:`~submerge.bench.cache.PartialRows`): the rows of a routed method finished by an earlier,
    stopped run, not computed again, and where each new one is kept as it finishes."""
    from submerge.search import search_alpha

    name, post = split_row_name(method)
    m = get_method(name)
    params = row_params(method)
    cfg = S.cfg
    t0 = time.perf_counter()
    settings, rows, test_correct = [], [], {}
    # what the method declares decides its rows (submerge.methods.MergeMethod.evaluation), not its name
    if m.evaluation == "routed":  # experts routed per input on the val-tuned merge of the method it builds on
        rows += esmpp_rows(S, m.builds_on, searched.get(m.builds_on), stats, test_correct,
                           searched.get(f"static_test:{m.builds_on}"), partial)
        return rows, test_correct
    if m.evaluation == "learned":
        return adamerging_rows(S, test_correct)
    if m.evaluation == "task_id":
        return tall_rows(S, params, test_correct, t0)
    model_params = None
    for p in m.per_task_params:  # e.g. each task's TALL-mask threshold, chosen on its own val
        values = per_task_choice(p)(S, params)[0]
        model_params = [{**(model_params[i] if model_params else {}), p: v} for i, v in enumerate(values)]
        params = {**params, p: dict(zip(S.names, values))}
    if post == "surgery":  # on the val-tuned merge of the row it is named after (a variant's own, if any)
        return surgery_rows(S, name, params, stats, test_correct, t0, searched.get(f"alpha:{method.partition('+')[0]}"))
    try:
        if post == "lines":  # LiNeS' beta on the authors' grid (every point), alpha by their norm rule
            found = search_alpha(name, S.base, S.experts, S.val_score, params, stats=stats, random_seed=cfg.seed,
                                 lines=True, grid=list(cfg.lambda_grid), patience=None)
            settings.append(("val-tuned", {**params, "lines": {"alpha": found.lines_alpha, "beta": found.alpha}},
                             found.state, found.alpha, found.curve))
        elif m.scale_param is None:
            merged = merge_state_dicts(name, S.base, S.experts, params, random_seed=cfg.seed, stats=stats)
            settings.append(("default", params, merged, None, None))
        else:
            search_params = {k: v for k, v in params.items() if k not in m.per_task_params}
            found = search_alpha(name, S.base, S.experts, S.val_score, search_params, model_params, stats=stats,
                                 random_seed=cfg.seed, **search_kwargs(cfg, m))
            if any(x.builds_on == method for x in list_methods()):  # ESM++ puts its experts on this merge
                searched[method] = found
            searched[f"alpha:{method}"] = found.alpha  # "<method>+surgery" starts from this merge
            default = m.param(m.scale_param).default
            settings.append(("default", params, found.path(default, copy=True), default, None))
            settings.append(("val-tuned", {**params, m.scale_param: found.alpha}, found.state, found.alpha,
                             found.curve))
    except ConfigError as e:
        S.say(f"skip {method}: {e}")
        return None
    seconds = time.perf_counter() - t0
    done: dict = {}
    for setting, p, state, alpha, curve in settings:
        label = f"{method} ({setting})" if len(settings) > 1 else method
        # the val-tuned scale can be the default one: the same model is scored once
        t_eval = time.perf_counter()
        row, res = S.test_row(method, setting, p, state, alpha, seconds, curve, label, res=done.get(alpha))
        if method in searched and setting == "val-tuned" and alpha not in done:  # a routed row's static reference
            searched[f"static_test:{method}"] = (res, time.perf_counter() - t_eval)
        done[alpha] = res
        test_correct[label] = res
        rows.append(row)
        S.say(f"{label:34s} scale {'-' if alpha is None else format(alpha, '.3g'):>5s}  "
              f"avg abs {100 * row['avg_abs']:.1f}  norm {100 * row['avg_norm']:.1f}")
    return rows, test_correct
