"""An MoE of the LLM suite's experts, scored as a reference row (issue 33): the experts (cached LoRA adapters, as
``base+adapter``) built into a Mixtral-style MoE by ``submerge moe`` and scored on the suite's questions.

Two gate modes: mergekit-moe's ``hidden`` (each expert's positive prompts — chat-formatted training questions of
its skill — through the base model) and submerge's ``calibration`` (each expert's mean MLP input, from the
suite's calibration statistics; no prompts).  Two experts per token, mergekit-moe's default; attention and
embeddings come from the base model, as mergekit-moe builds them.  An MoE has no scale to choose: test is scored
once per gate mode, with val beside it.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Optional

import numpy as np

from submerge.bench.evaluate import bootstrap_ci, paired_diff_ci
from submerge.bench.llm.session import LLMSession

N_PROMPTS = 8  # positive prompts per expert (hidden gates): its skill's first training questions
GATE_MODES = ("hidden", "calibration")


def chat_text(S: LLMSession, q) -> str:
    """A question as the model sees it (its demonstrations as earlier turns, the generation prompt included)."""
    from submerge.evaluate.generation import prompt_ids

    return S.cm.tokenizer.decode(prompt_ids(S.cm.tokenizer, q.prompt, shots=q.shots))


def moe_config(S: LLMSession, gate_mode: str, stats_dirs: Optional[list[Path]] = None) -> dict:
    """The mergekit-moe config of the suite's experts (one per skill, in order)."""
    experts = []
    for i, t in enumerate(S.names):
        e: dict = {"source_model": f"{S.cm.path}+{S.cache / 'experts' / S.expert_keys[i]}"}
        if gate_mode == "calibration":
            e["calibration"] = str(stats_dirs[i])
        else:
            e["positive_prompts"] = [chat_text(S, q) for q in S.splits[t].train[:N_PROMPTS]]
        experts.append(e)
    return {"base_model": str(S.cm.path), "gate_mode": gate_mode, "dtype": "float32", "experts_per_token": 2,
            "experts": experts, "architecture": "mixtral"}


def moe_rows(S: LLMSession, scratch: Path, gate_modes=GATE_MODES) -> list[dict]:
    """One row per gate mode: the MoE built into ``scratch``, scored on val and test."""
    from transformers import AutoModelForCausalLM

    from submerge.io.pretrained import load_pretrained
    from submerge.moe.build import MoEOptions, build_moe
    from submerge.moe.config import parse_moe_config

    ft_mean = [max(S.ft_test[t].mean(), 1e-9) for t in S.names]
    stats_dirs = None
    if "calibration" in gate_modes:
        stats_dirs = [st.save(scratch / f"stats-{i}") for i, st in enumerate(S.calibration(source="finetuned"))]
    rows = []
    for gate in gate_modes:
        t0 = time.perf_counter()
        folder = scratch / f"moe-{gate}"
        build_moe(parse_moe_config(moe_config(S, gate, stats_dirs)), folder,
                  MoEOptions(random_seed=S.cfg.seed, quiet=True, write_model_card=False))
        build_s = time.perf_counter() - t0
        model = load_pretrained(AutoModelForCausalLM, folder, quiet=True).eval()
        val = S.evaluate_model(model, "val")
        t1 = time.perf_counter()
        test = S.evaluate_model(model, "test")
        test_s = time.perf_counter() - t1
        per = {t: float(test[t].mean()) for t in S.names}
        _, lo, hi = paired_diff_ci([test[t] for t in S.names], [np.zeros_like(test[t]) for t in S.names], ft_mean)
        n_q = sum(len(test[t]) for t in S.names)
        rows.append({"method": "moe", "setting": f"{gate} gates", "label": f"moe ({gate} gates)",
                     "architecture": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
                     "per_task": per, "per_task_ci": {t: bootstrap_ci(test[t]) for t in S.names},
                     "avg_abs": float(np.mean(list(per.values()))),
                     "avg_norm": float(np.mean([per[t] / m for t, m in zip(S.names, ft_mean)])),
                     "avg_norm_ci": [lo, hi],
                     "val_norm": float(np.mean([val[t].mean() / S.ft_val_mean[t] for t in S.names])),
                     "per_task_nll": {t: float(test.nll[t].mean()) for t in S.names},
                     "build_seconds": build_s, "test_seconds": test_s, "ms_per_question": 1000 * test_s / n_q,
                     "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                     "per_example": {t: test[t].astype(int).tolist() for t in S.names}})
        del model
    return rows
