"""Where tensor math runs and what it may use: a ``--device`` string checked before anything is loaded, the
CPU threads, and how freed tensor memory goes back to the C allocator."""

from __future__ import annotations

import functools

import torch

from submerge.errors import ConfigError


def parse_device(spec: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:1``, ``mps`` ... as a torch.device that exists on this machine; ``auto``: the
    GPU when torch sees one (CUDA, else MPS), else the CPU."""
    if str(spec) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        dev = torch.device(str(spec))
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} was asked for, but torch sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"device {spec!r} was asked for, but torch sees no MPS device")
    elif dev.type != "cpu":
        raise ConfigError(f"device {spec!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    return dev


def available_cpus() -> int:
    """How many CPUs this process may really use: its CPU affinity, capped by a cgroup CPU quota (a container's
    ``--cpus``), at least 1.  ``os.cpu_count()`` counts the whole machine, and a torch pool sized by it
    oversubscribes the cores a busy or limited machine gives this process."""
    import math
    import os

    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _cgroup_quota() -> "float | None":
    """CPUs allowed by the cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None when unlimited."""
    from pathlib import Path

    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if len(text) == 2 and text[0] != "max" and float(text[1]) > 0:
            return float(text[0]) / float(text[1])
    except (OSError, ValueError):
        pass
    try:
        quota = float(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = float(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def use_threads(threads: "int | None" = None) -> int:
    """Size torch's CPU thread pool (and, through it, MKL/OpenBLAS/OpenMP work) to ``threads``, default
    :func:`available_cpus`; child processes (Ray workers, tokenizers) inherit the same limit through
    ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` unless the user set them.  Returns the count used."""
    import os

    n = int(threads) if threads else available_cpus()
    torch.set_num_threads(n)
    for var in THREAD_VARS:
        if var not in _USER_SET:
            os.environ[var] = str(n)
    return n


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_USER_SET = {v for v in THREAD_VARS if v in __import__("os").environ}  # set before submerge was imported


def busy_note(threads: int) -> "str | None":
    """A line to print before a long run when other work already keeps this machine's CPUs busy (the 1-minute
    load average, less this process, over :func:`available_cpus`): torch's and BLAS's thread pools then fight
    the other jobs for cores, and small linear algebra slows down by up to 10x.  None when the machine is quiet."""
    import os

    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cpus = available_cpus()
    if load < cpus - 0.5 or load < 1.0:
        return None
    share = max(1, cpus - round(load))
    return (f"the machine is busy (load {load:.1f} on {cpus} CPUs) and this run uses {threads} thread(s): expect it "
            f"to take longer than the README's quiet-machine times" + (
                f"; --threads {share} leaves the other jobs their cores" if share < threads else ""))


# How freed tensor memory goes back to glibc's malloc.  Each policy below was measured where it is used; all of
# them leave the allocator alone where the user chose one (_user_chose_allocator) and act on Linux with glibc only.
KEEP_MEMORY_VAR = "SUBMERGE_MALLOC"  # "system": leave the C allocator as the process found it
LEGACY_TUNING_VAR = "SUBMERGE_MALLOC_TUNING"  # "0": the same as SUBMERGE_MALLOC=system (kept for old scripts)
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top beyond this much is still given back to the system
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt's parameters (glibc's malloc.h)
_kept: "bool | None" = None


def _user_chose_allocator() -> bool:
    """The user set the allocator up: ``SUBMERGE_MALLOC=system`` (or ``SUBMERGE_MALLOC_TUNING=0``), a preloaded
    allocator (jemalloc, tcmalloc), glibc's own ``MALLOC_*`` variables or malloc tunables."""
    import os

    return os.environ.get(KEEP_MEMORY_VAR, "").strip().lower() == "system" or \
        os.environ.get(LEGACY_TUNING_VAR, "").strip() == "0" or bool(os.environ.get("LD_PRELOAD")) or \
        "malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(k.startswith("MALLOC_") for k in os.environ)


@functools.lru_cache(maxsize=None)
def _glibc():
    """This process's C library as a ctypes handle when it is glibc, else None (musl, macOS, Windows); looked up
    once per process."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # Windows: no handle for the process itself
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def _mallopt(*settings: "tuple[int, int]") -> bool:
    """Apply glibc ``mallopt`` settings unless the user chose the allocator; whether all of them took."""
    import ctypes

    libc = None if _user_chose_allocator() else _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([bool(mallopt(param, value)) for param, value in settings])


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks for reuse instead of handing them back to the kernel.  By default
    glibc serves every block over 32 MiB (a batch's activations, a LoRA step's gradients) with a fresh ``mmap``
    and unmaps it on free, and gives back free heap past 64 MiB, so the next batch faults the same memory in
    again page by page (the kernel zeroing each page).  On SmolLM2-135M (2 threads on 2 cores, 2026-12-07) that
    was 10% of a forward pass's CPU time and 9% of a LoRA step's as system time; keeping the blocks cut the wall
    time of a LoRA training step by about 20% (8.0-9.8 s against 9.7-11.8 s for 3 steps of 8 x 48 tokens) and of
    a forward pass of 32 x 160 tokens by about 11% (32.9-42.2 s against 41.3-46.3 s for 3), for 0.1 GB more peak
    memory.  No number changes: only where memory comes from.

    Sets ``M_MMAP_MAX = 0`` (every block comes from the heap) and ``M_TRIM_THRESHOLD`` = :data:`TRIM_THRESHOLD`
    (free memory at the heap's top is still given back past 1 GiB; ``malloc_trim`` between a benchmark's phases
    gives back the rest).  The cost is fragmentation: blocks freed between smaller live ones stay resident until
    reused (a loop of 64 MiB tensors settled at 450 MB more).  So ``submerge bench --suite llm`` calls it, where it
    was measured; ``merge`` takes the milder :func:`reuse_freed_buffers` (blocks over 1 GiB still mapped).  Leaves
    the allocator alone, returning False, when the C library is not glibc or the user chose the allocator
    (:func:`_user_chose_allocator`).  Acts once per process; returns whether the setting is in force."""
    global _kept
    if _kept is None:
        _kept = _mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _kept


def reuse_freed_buffers() -> bool:
    """Let a merge reuse freed tensor buffers: a merge allocates and frees the same few buffer sizes once per
    tensor (the inputs in the compute dtype, the output), and by default glibc serves each one above 32 MB by a
    fresh ``mmap`` and returns freed heap tops to the kernel, so every tensor pays its page faults again (about 12%
    of a TIES merge's wall time on a 2-core machine, measured).  Raises the mmap and trim thresholds to 1 GiB, at
    the cost of the process keeping its peak heap until it exits.  The console script's ``merge`` calls it (a
    short-lived process doing one merge); never on import.  Whether the setting took (False where the user chose
    the allocator, see :func:`_user_chose_allocator`)."""
    return _mallopt((M_MMAP_THRESHOLD, TRIM_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def bound_heap(threshold: int = 1 << 20) -> bool:
    """Serve every block above ``threshold`` bytes by its own mmap, returned to the kernel when freed.  glibc's
    default threshold grows with what was freed, so buffers of ever-changing sizes (a fine-tuning batch of
    questions of another length at every step) pile up in the heap: an LLM-suite session reached 24 GB and was
    killed, with about 11 GB alive.  Fixing the threshold also stops its growth.  Does nothing once
    :func:`keep_freed_memory` is in force (every block then comes from the heap) or where the user chose the
    allocator; whether the setting took."""
    if _kept:
        return False
    return _mallopt((M_MMAP_THRESHOLD, int(threshold)))


def release_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the OS (glibc's ``malloc_trim``; also under the
    settings above and the user's own, since it changes none).  glibc keeps freed blocks of torch's CPU tensors in
    its arenas, so without this a benchmark's resident size only grows from phase to phase (fine-tuning, each
    method's search buffers) although nothing is kept."""
    import gc

    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
