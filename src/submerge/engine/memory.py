"""The in-memory engine: state dicts in, state dicts out (no files), for searches, benchmarks and tuning.

Each tensor goes through the same per-tensor step as the streamed merge (:class:`~submerge.engine.step.TensorStep`:
seeds, the method's context, overflow and shape checks); the method's whole-model ``prepare`` pass, statistics and
LiNeS are bound here as the executor binds them for files.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch

from submerge.engine.config import evaluate_setting
from submerge.engine.step import TensorStep
from submerge.errors import CheckpointError, ConfigError
from submerge.layers import layer_structure
from submerge.methods import ModelPass, get_method, workspace


def merge_state_dicts_many(
    method: str,
    base: Optional[Mapping[str, torch.Tensor]],
    models: Sequence[Mapping[str, torch.Tensor]],
    parameter_sets: Sequence[Optional[dict]],
    model_parameters: Optional[Sequence[Optional[dict]]] = None,
    *,
    stats: Optional[Sequence[Any]] = None,
    random_seed: int = 0,
    compute_dtype: torch.dtype = torch.float32,
    lines: Any = None,
) -> list[dict[str, torch.Tensor]]:
    """Several merges of the same inputs that differ only in parameters the method's whole-model
    ``prepare`` pass does not read (e.g. its scale): the pass runs once, with the first set.  ``lines``:
    LiNeS on each (see :func:`merge_state_dicts`; with ``alpha`` auto, each set gets its own)."""
    from submerge.methods.lines import Lines
    from submerge.stats.load import LazyStats, check_stats_kind, load_stats

    m = get_method(method)
    lines = Lines.of(lines)
    if m.needs_base and base is None:
        raise ConfigError(f"{m.name} needs a base model")
    if lines is not None and not m.needs_base:
        raise ConfigError(f"lines: LiNeS rescales a task-vector method's update; {m.name} makes none")
    if m.base_role == "input" and base is not None:
        models, base = [*models, base], None
        model_parameters = None if model_parameters is None else [*model_parameters, None]
    n = len(models)
    if n < m.min_models or (m.max_models is not None and n > m.max_models):
        raise ConfigError(f"{m.name} cannot merge {n} model(s)")
    ref = base if base is not None else models[0]
    float_names = [k for k, v in ref.items() if v.is_floating_point()]
    per_model = list(model_parameters or [None] * n)
    graded = any(isinstance(v, (list, tuple)) for d in [*parameter_sets, *per_model] if d for v in d.values())
    if graded:  # a list is a gradient over the layers (as in a config): resolved per tensor, then bound
        t_of = layer_positions(float_names)

        def bind_at(p: Optional[dict], name: str) -> dict:
            def at(d: Optional[dict]) -> Optional[dict]:
                return None if d is None else {k: evaluate_setting(list(v), name, t_of.get(name, 0.0))
                                               if isinstance(v, (list, tuple)) else v for k, v in d.items()}
            return m.bind(at(p), [at(d) for d in per_model])

        first = float_names[0] if float_names else ""
        kwargs_list = [bind_at(p, first) for p in parameter_sets]
    else:
        kwargs_list = [m.bind(p, per_model) for p in parameter_sets]

    def kwargs_of(i: int, name: str) -> dict:
        return bind_at(parameter_sets[i], name) if graded else kwargs_list[i]

    for i, sd in enumerate(models):
        missing = set(ref) - set(sd)
        if missing:
            raise CheckpointError(f"model {i} is missing tensor(s) {sorted(missing)[:3]}")
    uses_stats = m.uses_stats(kwargs_list[0])
    if uses_stats:
        if stats is None or len(stats) != n:
            raise ConfigError(f"{m.name} needs calibration statistics for each of the {n} models "
                              f"(stats=[...], from submerge.stats.gram.collect_stats or `submerge calibrate`)")
        stats = [load_stats(s) for s in stats]
        for i, s in enumerate(stats):
            check_stats_kind(s, m.stats_kind, m.name, f"stats[{i}]")
    stats_of = (lambda name: LazyStats([(s, name) for s in stats])) if uses_stats else None

    copy = not m.inputs_read_only  # a method that writes into its inputs gets copies, never the caller's tensors

    def read(name: str):
        tensors = [sd[name].to(compute_dtype, copy=copy) for sd in models]
        b = base[name].to(compute_dtype, copy=copy) if base is not None else None
        return tensors, b

    state = None
    if m.needs_prepare(kwargs_list[0]):
        state = m.prepare(ModelPass(float_names, read, lambda name: kwargs_of(0, name), [str(i) for i in range(n)],
                                    stats=stats_of), kwargs_list[0])
    step = TensorStep(m, random_seed, state=state)
    outs: list[dict[str, torch.Tensor]] = [{} for _ in kwargs_list]
    for name, value in ref.items():
        if name not in float_names:
            for out in outs:
                out[name] = value.clone()
            continue
        st = stats_of(name) if stats_of is not None else None
        for i, out in enumerate(outs):
            tensors, b = read(name)
            merged = step(name, tensors, b, kwargs_of(i, name), stats=st, shape=value.shape)
            out[name] = merged if lines is not None else merged.to(value.dtype)
    if lines is not None:
        apply_lines(lines, outs, base, models, float_names, compute_dtype)
    workspace.release()
    return outs


def layer_positions(names: Sequence[str]) -> dict[str, float]:
    """Where each tensor of the layer stack sits, from 0 (first layer) to 1 (last), as a config's gradients read
    it (one slice over every layer); tensors outside the stack are absent (they take position 0)."""
    _, layers = layer_structure(list(names))
    if not layers:
        return {}
    top = max(i for i, _ in layers.values())
    return {n: (i / top if top else 1.0) for n, (i, _) in layers.items()}


def apply_lines(lines, outs: list[dict[str, torch.Tensor]], base: Mapping[str, torch.Tensor],
                models: Sequence[Mapping[str, torch.Tensor]], names: list[str], compute_dtype) -> None:
    """LiNeS on merged state dicts (tensors in the compute dtype, cast to the base's dtype here)."""
    from submerge.methods import lines as L

    depths, _ = L.block_depths(names)
    for out in outs:
        alpha = lines.alpha
        if alpha is None:
            alpha = L.alpha_from_states(base, models, out, names, compute_dtype)
        for n in names:
            b = base[n].to(compute_dtype)
            out[n] = L.rescale_(out[n], b, L.scale_of(depths[n], alpha, lines.beta)).to(base[n].dtype)
