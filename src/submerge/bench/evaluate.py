"""Scoring with frozen heads, and bootstrap intervals."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from submerge.bench.backbone import Backbone


def correct(backbone: Backbone, texts: Sequence[str], labels: Sequence[int], head: torch.Tensor) -> np.ndarray:
    """Per-example 0/1 correctness of the current encoder with a frozen head."""
    pred = (backbone.embed(texts) @ head.T).argmax(-1).numpy()
    return (pred == np.asarray(labels)).astype(np.float64)


def bootstrap_ci(x: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of ``x`` over examples."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    means = x[idx].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_diff_ci(per_task_a: list[np.ndarray], per_task_b: list[np.ndarray],
                   norm: Sequence[float] | None = None, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean over tasks of (a - b) accuracy (optionally divided by per-task ``norm``), with a paired
    bootstrap over each task's test examples (same resample for both). Returns (diff, lo, hi)."""
    rng = np.random.default_rng(seed)
    draws = np.zeros(n_boot)
    point = 0.0
    for t, (a, b) in enumerate(zip(per_task_a, per_task_b)):
        scale = 1.0 / norm[t] if norm is not None else 1.0
        d = (a - b) * scale
        point += d.mean()
        idx = rng.integers(0, len(d), size=(n_boot, len(d)))
        draws += d[idx].mean(1)
    k = len(per_task_a)
    return point / k, float(np.percentile(draws / k, 2.5)), float(np.percentile(draws / k, 97.5))


def pack_correct(correct) -> str:
    """Per-example correctness (0/1 per test example, in split order) as a hex string of packed bits."""
    return np.packbits(np.asarray(correct).astype(bool)).tobytes().hex()


def unpack_correct(packed: str, n: int) -> np.ndarray:
    """Inverse of :func:`pack_correct` for a split of ``n`` examples (float 0/1, as the scorers return)."""
    return np.unpackbits(np.frombuffer(bytes.fromhex(packed), dtype=np.uint8))[:n].astype(float)
