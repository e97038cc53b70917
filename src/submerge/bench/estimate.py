"""What is left of a benchmark run, from what each step is expected to cost.

Every progress line of ``submerge bench`` ends with one estimate for the whole run: the phase, steps done of
all, the time so far and what is left.  What is left is the expected cost of the steps not yet done (fine-tuning
one expert; each method with its scale search and statistics), in seconds measured on the quick suite
(``costs.json`` beside this file: 2 quiet cores), times how much slower or faster this run has been so far
than those measurements (a busy machine, a larger suite).  A mean over the finished methods would not do: the
cheap methods finish first and the subspace methods last, so such an estimate says "1 minute left" with 7 to go.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Iterable, Optional

COSTS_FILE = Path(__file__).with_name("costs.json")


def shipped_costs() -> dict:
    """``{"finetune": seconds per expert, "methods": {name: seconds}}`` as measured on the quick suite."""
    try:
        data = json.loads(COSTS_FILE.read_text())
    except (OSError, ValueError):
        return {"finetune": 30.0, "methods": {}}
    return {"finetune": float(data.get("finetune", 30.0)), "methods": dict(data.get("methods", {}))}


class RunEstimate:
    """The run's steps (experts to fine-tune, methods to run) with their expected costs; told when each ends."""

    def __init__(self, n_experts: int, methods: Iterable[str], t_start: Optional[float] = None,
                 costs: Optional[dict] = None):
        costs = costs or shipped_costs()
        known = [float(v) for v in costs["methods"].values()] or [30.0]
        self.expert_cost = float(costs["finetune"])
        self.method_cost = {m: float(costs["methods"].get(m, statistics.median(known))) for m in methods}
        self.experts_left = n_experts
        self.n_experts = n_experts
        self.methods_left = dict(self.method_cost)
        self.t_start = time.perf_counter() if t_start is None else t_start
        self.expected_done = 0.0  # the expected cost of the steps this run has done itself (not kept ones)
        self.spent = 0.0  # their measured seconds

    def expert_done(self, seconds: Optional[float]) -> None:
        """An expert is ready: fine-tuned in ``seconds``, or None when it came from the cache."""
        self.experts_left = max(0, self.experts_left - 1)
        if seconds is not None:
            self.expected_done += self.expert_cost
            self.spent += seconds

    def method_done(self, method: str, seconds: Optional[float]) -> None:
        """A method's rows are ready: computed in ``seconds``, or None when kept from an earlier run."""
        cost = self.methods_left.pop(method, 0.0)
        if seconds is not None:
            self.expected_done += cost
            self.spent += seconds

    @property
    def speed(self) -> float:
        """This run's seconds per expected second so far (1 until something has been measured)."""
        return self.spent / self.expected_done if self.expected_done > 0 and self.spent > 0 else 1.0

    def left(self) -> float:
        """Seconds left: the expected cost of every step not done, at this run's speed."""
        return self.speed * (self.experts_left * self.expert_cost + sum(self.methods_left.values()))

    def line(self) -> str:
        """``phase done/total, elapsed m:ss, about N min left``."""
        n_methods = len(self.method_cost)
        if self.experts_left:
            phase = f"fine-tuning {self.n_experts - self.experts_left}/{self.n_experts} experts"
        else:
            phase = f"methods {n_methods - len(self.methods_left)}/{n_methods}"
        elapsed = int(time.perf_counter() - self.t_start)
        left = self.left()
        when = ("about " + (f"{left / 60:.0f} min" if left >= 90 else f"{max(left, 1):.0f} s") + " left") \
            if self.experts_left or self.methods_left else "done"
        return f"[{phase}; {elapsed // 60}:{elapsed % 60:02d} elapsed; {when}]"
