"""The methods' workspace: per-thread scratch arrays reused between calls and a small shared thread pool for
kernels that release the GIL, both dropped by :func:`release` at the end of every merge (the engines call it).
Kept apart from the kernels (:mod:`submerge.methods.kernels`), which are pure functions of tensors.
"""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import torch

_LOCAL = threading.local()
_SCRATCH_MAX = 1 << 25  # elements kept per thread between calls (128 MB in float32)


class _Scratch:
    buf = None


_SCRATCHES: "weakref.WeakSet[_Scratch]" = weakref.WeakSet()  # live threads' holders, for release() from any thread
_SCRATCH_LOCK = threading.Lock()


def scratch(n: int, dtype):
    """A per-thread scratch array of ``n`` elements, reused between calls (a fresh multi-MB array costs
    more in page faults than the selection run on it); larger requests get a one-off array.  Kept until
    :func:`release` (the end of each merge)."""
    import numpy as np

    if n > _SCRATCH_MAX:
        return np.empty(n, dtype=dtype)
    holder = getattr(_LOCAL, "scratch", None)
    if holder is None:
        holder = _LOCAL.scratch = _Scratch()
        with _SCRATCH_LOCK:
            _SCRATCHES.add(holder)
    buf = holder.buf
    if buf is None or buf.dtype != dtype or buf.size < n:
        buf = holder.buf = np.empty(max(n, 1 << 20), dtype=dtype)
    return buf[:n]


def release() -> None:
    """The end of a merge: drop every thread's scratch array (a call in progress keeps its own view alive) and
    stop the worker threads of :func:`parallel_map`.  Up to 8 pool threads each kept a scratch array sized
    for the largest tensor selected (47 MB each for a 30k x 384 embedding table: a bench run held 0.3-0.4 GB
    of them between merges); and idle workers that had run torch ops (each with its own OpenMP team) made
    MKL's SVD 2x slower for the rest of the process (TSV-M's merge after a TIES merge: 31 s -> 47 s)."""
    global _POOL
    with _SCRATCH_LOCK:
        for holder in _SCRATCHES:
            holder.buf = None
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None:
        pool.shutdown(wait=True)


_POOL: Optional[ThreadPoolExecutor] = None
_POOL_LOCK = threading.Lock()


def parallel_map(fn: Callable, items: Sequence, sizes: Sequence[int] = (), min_size: int = 1 << 20) -> list:
    """``[fn(x) for x in items]``, run on a small shared thread pool when there are several items of at
    least ``min_size`` elements and torch may use several threads; for kernels that release the GIL
    (numpy selection, torch ops).  Results in input order."""
    global _POOL
    if len(items) < 2 or torch.get_num_threads() < 2 or (sizes and min(sizes) < min_size):
        return [fn(x) for x in items]
    # all items at once (up to 8) when each is small enough that the copies a worker makes do not matter:
    # 3 selections on 2 cores finish in 1.5 rounds instead of 2; huge tensors: one worker per core
    # (each worker's scratch copy lives until release(), the end of the merge)
    workers = min(len(items), 8) if max(sizes, default=0) <= 1 << 26 else min(len(items), torch.get_num_threads())
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers:
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="submerge-kernel")
        pool = _POOL
    futures = []
    for x in items:
        try:
            futures.append(pool.submit(fn, x))
        except RuntimeError:  # another merge ended meanwhile and released the pool: run this item here
            futures.append(None)
    return [fn(x) if f is None else f.result() for f, x in zip(futures, items)]
