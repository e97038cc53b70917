"""``submerge bench --backend ray``: the benchmark's method rows on Ray actors.

The driver's :class:`~submerge.bench.session.BenchSession` fine-tunes (or loads) the experts, scores the
references and computes the statistics the methods read; all of it goes into the object store once
(:meth:`~submerge.bench.session.BenchSession.share`).  Each actor rebuilds a session from it (the backbone
and the task data from the same packages, nothing fine-tuned or scored again) and computes whole methods
(:func:`~submerge.bench.rows.method_rows`, the code the local run uses), so the rows are the local rows.
A method that builds on another (ESM++ on ESM, as it declares) runs in the same call after it.  Methods finish in any
order; each is cached as it arrives (a stopped run resumes), and the table keeps the method order.
Scheduling, restarts and retries are Ray's (:class:`~submerge.evaluate.backends.RayBackend`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional, Sequence

import torch

from submerge.bench.presets import split_row_name, stats_for
from submerge.bench.rows import method_rows
from submerge.bench.session import BenchSession
from submerge.device import release_memory
from submerge.errors import SubmergeError
from submerge.methods import get_method


def units_of(methods: Sequence[str]) -> list[list[str]]:
    """The calls: one per method, except that a row built on another method's val-tuned merge follows that
    method in its call: a method after the one it ``builds_on`` (ESM++ after ESM), ``<method>+surgery`` after
    ``<method>``."""
    units: list[list[str]] = []
    for m in methods:
        name, post = split_row_name(m)
        on = name if post == "surgery" else get_method(name).builds_on
        host = next((u for u in units if u[0] == on), None) if on else None
        if host is not None:
            host.append(m)
        else:
            units.append([m])
    return units


class _BenchActor:
    """A benchmark session inside a Ray actor, built from the driver's shared state."""

    def __init__(self, shared: dict, cfg, threads: int):
        torch.set_num_threads(max(1, threads))
        self.S = BenchSession(dataclasses.replace(cfg, quiet=True), shared=shared)
        self.alphas = dict(shared.get("alphas", {}))  # val-tuned scales of methods already finished

    def run(self, unit: list[str]) -> list[tuple[str, object, float]]:
        searched: dict = dict(self.alphas)
        out = []
        for method in unit:
            t0 = time.perf_counter()
            got = method_rows(self.S, method, stats_for(self.S, method), searched)
            release_memory()
            out.append((method, got, time.perf_counter() - t0))
        return out


def ray_method_rows(S, methods: Sequence[str], finished: Callable[[str, object, float], None],
                    address: Optional[str] = None, actors: Optional[int] = None,
                    alphas: Optional[dict] = None) -> None:
    """Compute ``methods``' rows on Ray; ``finished(method, rows_or_None, seconds)`` as each arrives.
    ``alphas``: ``{"alpha:<method>": scale}`` of methods whose rows were kept (``+surgery`` rows start there)."""
    from submerge.evaluate.backends import RayBackend

    units = units_of(methods)
    for m in methods:  # every statistic once, here, before the actors start
        stats_for(S, m)
    shared = {**S.share(), "alphas": dict(alphas or {})}
    backend = RayBackend(address, actors=actors)
    backend.n_actors = min(backend.n_actors, len(units))
    S.say(f"ray: {backend.n_actors} actor(s) for {len(units)} call(s)")
    failures: list[str] = []
    try:
        backend.start_actors(_BenchActor, backend.put(shared), S.cfg, backend.cpus_per_actor)

        def on_result(unit, out) -> None:
            for method, got, seconds in out:
                finished(method, got, seconds)

        def on_error(unit, e: Exception) -> None:
            failures.append(f"{'+'.join(unit)}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")

        backend.map_unordered(units, on_result, on_error)
    finally:
        backend.close()
    if failures:
        raise SubmergeError("on Ray, these methods failed (the others are kept; rerun to retry them): "
                            + "; ".join(failures))
