"""Why the mixture rule equals the diagonal rule on rt_sentiment vs rt_subjectivity (a diagnostic).

Runs the mixture EM of ``posterior`` (family mixture; the two fine-tunes of each task as components,
each with its sampled Fisher) at task weights 0.5 and 0.8 and prints the objective after each step,
the final responsibilities, and ½ log det of each component's precision (summed over all parameters).

    python benchmarks/pareto_mixture_check.py   # writes results/pareto/mixture_check.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from submerge.bench.pareto import _extra_seed_experts
from submerge.bench.session import BenchConfig, BenchSession
from submerge.methods import ModelPass
from submerge.methods.posterior import _mixture_prepare, _prior


def main() -> None:
    S = BenchSession(BenchConfig(tasks=["rt_sentiment", "rt_subjectivity"], quiet=True))
    comps = list(S.experts) + _extra_seed_experts(S, 1)
    F = S.fisher() + S.fisher(experts=comps[2:])
    tasks = S.names * 2
    names = list(S.base)
    out: dict = {"components": [f"{t} seed {s}" for s in (0, 1) for t in S.names]}
    for w in (0.5, 0.8):
        mp = ModelPass(names, lambda n: ([c[n].float().clone() for c in comps], S.base[n].float().clone()),
                       lambda n: {"weight": [w, 1 - w, w, 1 - w], "task": tasks}, [str(i) for i in range(4)],
                       stats=lambda n: [f.lookup(n) for f in F])
        st = _mixture_prepare(mp, {"prior_precision": 1e-3, "em_steps": 3, "family": "mixture"})
        out[f"weight_{w}"] = {"objective_history": st.history, "responsibilities": st.resp.tolist()}
    out["half_logdet_per_component"] = [
        0.5 * sum(float(torch.log(f.lookup(n).float() + _prior(1e-3, [g.lookup(n) for g in F])).sum())
                  for n in names) for f in F]
    path = Path(__file__).resolve().parent / "results" / "pareto" / "mixture_check.json"
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
