"""Routing diagnostics: per-layer routing accuracy and the routed-vs-true task confusion matrix."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Optional

import torch

from submerge.routing.runtime import Router


@dataclass
class RoutingReport:
    """``confusion[true, routed]`` counts (layer, sample) decisions; ``per_layer`` accuracy per routed layer."""

    tasks: list[str]
    confusion: torch.Tensor
    per_layer: dict[str, float] = field(default_factory=dict)
    per_layer_n: dict[str, int] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        total = self.confusion.sum()
        return float(self.confusion.diagonal().sum() / total) if total else float("nan")

    def to_dict(self) -> dict:
        return {"tasks": self.tasks, "accuracy": self.accuracy, "per_layer": self.per_layer,
                "confusion": self.confusion.tolist()}

    def markdown(self) -> str:
        head = "| true \\ routed | " + " | ".join(self.tasks) + " |"
        lines = [head, "|" + "---|" * (len(self.tasks) + 1)]
        for i, t in enumerate(self.tasks):
            row = self.confusion[i]
            tot = max(int(row.sum()), 1)
            lines.append(f"| {t} | " + " | ".join(f"{100 * int(c) / tot:.1f}" for c in row) + " |")
        return "\n".join(lines)


class RoutingRecorder:
    """Accumulates routing decisions over labelled forward passes.

    Usage::

        rec = RoutingRecorder(router)
        for batch, task_id in data:
            with rec.batch(task_id):
                model(**batch)
        report = rec.report()
    """

    def __init__(self, router: Router, layers: Optional[Iterable[str]] = None):
        self.router = router
        self.T = len(router.tasks)
        self.only = set(layers) if layers is not None else None
        self.confusion: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def batch(self, true_task) -> Iterator[dict]:
        """Record the forward passes inside as having true task ``true_task`` (an int or one per sample)."""
        with self.router.recording() as records:
            yield records
        self.add(records, true_task)

    def add(self, records: Mapping[str, list[torch.Tensor]], true_task) -> None:
        for layer, chunks in records.items():
            if self.only is not None and layer not in self.only:
                continue
            routed = torch.cat(chunks)
            truth = torch.as_tensor(true_task).long().view(-1)
            if truth.numel() == 1:
                truth = truth.expand(routed.numel())
            cm = self.confusion.setdefault(layer, torch.zeros(self.T, self.T, dtype=torch.long))
            cm.view(-1).index_add_(0, truth * self.T + routed, torch.ones_like(routed))

    def report(self) -> RoutingReport:
        total = torch.zeros(self.T, self.T, dtype=torch.long)
        per, per_n = {}, {}
        for layer, cm in self.confusion.items():
            total += cm
            n = int(cm.sum())
            per[layer] = float(cm.diagonal().sum() / n) if n else float("nan")
            per_n[layer] = n
        return RoutingReport(list(self.router.tasks), total, per, per_n)
