"""``submerge merge --backend ray``: one merge spread over a Ray cluster, shard by shard.

The driver plans the merge as a local one does, and cuts the output into the same shards
(:func:`~submerge.io.writer.shard_layout`).  If the method has a whole-model pass, it runs once: as Ray tasks
over runs of whole layers when the method splits it (ESM: each task spills its layers' unscaled results into the
output's temporary folder and returns their norms, which the driver joins), else on the driver.  LiNeS'
schedule runs on the driver.  Their result goes into the object store.  Then the driver submits one Ray task per
shard.  Each task re-plans from the config, reading only headers from storage every node sees.  It reads its
shard's inputs, merges them on its GPU or CPU through the same per-tensor step as a local merge (same
per-tensor seeds), and writes that shard's file into the output's temporary folder.  The driver then writes the
index, config, tokenizer, model card and post-merge work.  The folder appears atomically under the same rules
as a local merge: inputs refused as OUT, a lock, finite tensors, nothing left behind on failure.  So the files
are byte for byte a local merge's.

Ray schedules and retries; submerge only submits.  A task whose worker dies is run again (``max_retries``),
and rewriting its shard or its part is idempotent.  A method that keeps a sidecar of every tensor (ESM++'s
experts) runs locally only, for now.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from submerge.device import THREAD_VARS
from submerge.engine.config import MergeConfig
from submerge.engine.executor import Executor, MergeResult
from submerge.engine.plan import MergeOptions, plan_merge
from submerge.errors import ConfigError, SubmergeError

KILL_ONCE_ENV = "SUBMERGE_RAY_KILL_ONCE"  # tests: an existing folder; each shard's first attempt kills its worker


def _specs(ex: Executor) -> list[tuple]:
    return [(j.out_name, ex._out_dtype(j), tuple(j.shape)) for j in ex.plan.jobs]


def merge_shard(cfg: MergeConfig, config_dir: Optional[str], opts: MergeOptions, shard: int, tmp: str,
                seed: Optional[int], shared: tuple) -> int:
    """One Ray task: shard ``shard`` of the merge written into ``tmp``; returns the bytes it read."""
    from submerge.io.writer import ShardWriter, parse_size

    kill = os.environ.get(KILL_ONCE_ENV)
    if kill and Path(kill).is_dir():
        marker = Path(kill) / f"shard-{shard}"
        if not marker.exists():
            marker.write_text("killed once\n")
            os._exit(1)  # a worker dying mid-task: Ray runs the task again
    state, lines_scales = shared
    plan = plan_merge(cfg, Path(config_dir) if config_dir else None, strict=opts.strict)
    try:
        ex = Executor(plan, dataclasses.replace(opts, random_seed=seed, quiet=True))
        ex._lines_scales = lines_scales
        writer = ShardWriter(Path(tmp), _specs(ex), parse_size(opts.out_shard_size), only=shard)
        jobs = [j for j in plan.jobs if j.out_name in writer.slots]
        read = 0
        try:
            for job, data in ex._iter_loaded(jobs, stage=plan.method.stage):
                out, size = ex.output(job, data, state)
                writer.add(job.out_name, out)
                read += size
            writer.finish()
        finally:
            writer.close()
        return read
    finally:
        plan.close()


def prepare_part(cfg: MergeConfig, config_dir: Optional[str], opts: MergeOptions, names: list[str],
                 scratch: str, seed: Optional[int]) -> Any:
    """One Ray task: the method's whole-model pass over ``names`` (whole layers), its results spilled into
    ``scratch`` (storage every node sees); returns the part for the driver's ``prepare_combine``."""
    plan = plan_merge(cfg, Path(config_dir) if config_dir else None, strict=opts.strict)
    try:
        ex = Executor(plan, dataclasses.replace(opts, random_seed=seed, quiet=True))
        ex._scratch = Path(scratch)
        return ex._prepare(only=names)
    finally:
        plan.close()


def task_options(on_gpu: bool, cpus: int) -> dict:
    """A merge task's Ray options: retried when its worker dies, one GPU or none, ``cpus`` CPUs reserved and the
    thread pools of its worker sized to them.  The worker's environment says so too (its OpenMP and BLAS read it
    when the process starts): a driver started with ``OMP_NUM_THREADS=2`` would otherwise pass that to every
    worker, and two tasks side by side on two cores would each run two threads (measured: ESM twice as slow)."""
    return {"max_retries": 3, "retry_exceptions": False, "num_gpus": 1 if on_gpu else 0, "num_cpus": cpus,
            "runtime_env": {"env_vars": {k: str(cpus) for k in THREAD_VARS}}}


def layer_parts(names: Sequence[str], sizes: dict[str, int], n_parts: int) -> list[list[str]]:
    """``names`` cut into ``min(n_parts, units)`` runs of whole layers (every tensor of one numbered block in one run;
    a tensor outside the block stack is a unit of its own), of about equal total ``sizes``, in order."""
    from submerge.layers import layer_structure

    _, layers = layer_structure(list(names))
    units: list[list[str]] = []
    index: dict[int, int] = {}
    for n in names:
        if n in layers:
            i = layers[n][0]
            if i not in index:
                index[i] = len(units)
                units.append([])
            units[index[i]].append(n)
        else:
            units.append([n])
    n_parts = max(1, min(n_parts, len(units)))
    total = sum(sizes[n] for u in units for n in u)
    parts: list[list[str]] = [[]]
    done = 0
    for k, u in enumerate(units):
        left = len(units) - k  # units not yet placed, u included
        if parts[-1] and len(parts) < n_parts and (done >= total * len(parts) / n_parts
                                                   or left == n_parts - len(parts)):
            parts.append([])
        parts[-1].extend(u)
        done += sum(sizes[n] for n in u)
    return parts


def _prepare_on_ray(ray: Any, ex: Executor, cfg: MergeConfig, where: Optional[str], opts: MergeOptions,
                    n_parts: int, scratch: Path, on_gpu: bool) -> Any:
    """The method's whole-model pass as Ray tasks over runs of whole layers, joined on the driver by the method's
    ``prepare_combine``: the same state as the local pass."""
    jobs = [j for j in ex.plan.jobs if j.copy_from is None]
    sizes = {j.out_name: math.prod(j.shape) for j in jobs}
    parts = layer_parts([j.out_name for j in jobs], sizes, n_parts)
    task = ray.remote(prepare_part).options(**task_options(on_gpu, opts.threads))
    refs = [task.remote(cfg, where, opts, names, str(scratch / f"part-{i}"), ex.seed)
            for i, names in enumerate(parts)]
    got = _gather(ray, refs)
    ex.plan.notes.append(f"whole-model pass on Ray: {len(parts)} task(s) over whole layers")
    return ex.plan.method.prepare_combine(got, ex.plan.global_params)


def merge_on_ray(cfg: MergeConfig, config_dir: Optional[Path], opts: MergeOptions, out: Path,
                 inputs: Sequence[Path], address: Optional[str] = None) -> MergeResult:
    """Merge ``cfg`` into ``out`` on the Ray cluster at ``address`` (a new local instance without one)."""
    from submerge.cluster import check_ray_address, ray_session
    from submerge.io import atomic_folder
    from submerge.io.writer import parse_size, shard_layout, write_index

    check_ray_address(address)
    t0 = time.perf_counter()
    plan = plan_merge(cfg, config_dir, strict=opts.strict)
    try:
        if plan.method.sidecar is not None:
            raise ConfigError(f"--backend ray: {plan.method.name} keeps a sidecar of every merged tensor and runs "
                              "on one machine for now; run it without --backend ray")
        ex = Executor(plan, opts)
        files, groups = shard_layout(_specs(ex), parse_size(opts.out_shard_size))
        total = sum(g[3] for group in groups for g in group)
        shard_of = {name: i for i, group in enumerate(groups) for name, *_ in group}
        with ray_session(address) as ray, atomic_folder(out, opts.overwrite, "output folder",
                                                        inputs=[*inputs, *plan.inputs], planned_bytes=total) as tmp:
            ex._scratch = tmp / ".scratch"
            gpus = int(ray.cluster_resources().get("GPU", 0))
            on_gpu = gpus > 0 and opts.device in ("auto", "cuda")
            # each task reserves the CPUs its torch threads use (--threads, else 1; at most a node's CPUs), so
            # the tasks side by side on a node never ask for more threads than it has cores
            node_cpus = max([int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] or [1])
            cpus = max(1, min(opts.threads or 1, node_cpus))
            worker_opts = dataclasses.replace(opts, device="cuda" if on_gpu else "cpu", threads=cpus)
            where = str(config_dir) if config_dir is not None else None
            m = plan.method
            if m.prepare_part is not None and m.needs_prepare(plan.global_params):
                state = _prepare_on_ray(ray, ex, cfg, where, worker_opts, len(files), ex._scratch, on_gpu)
            else:
                state = ex._prepare()
            if ex._lines is not None:
                ex._lines_scales = ex._lines_schedule(state)
            task = ray.remote(merge_shard).options(**task_options(on_gpu, worker_opts.threads))
            shared = ray.put((state, ex._lines_scales))
            refs = [task.remote(cfg, where, worker_opts, i, str(tmp), ex.seed, shared) for i in range(len(files))]
            read = sum(_gather(ray, refs))
            write_index(tmp, files, shard_of, total)
            shutil.rmtree(tmp / ".scratch", ignore_errors=True)
            plan.notes.append(f"merged on Ray: {len(files)} shard task(s), {'GPU' if on_gpu else 'CPU'} workers")
            ex._write_metadata(tmp, files)
            for hook in plan.post_merge:
                note = hook(tmp, device=str(ex.device), progress=not opts.quiet)
                if note:
                    plan.notes.append(note)
    finally:
        plan.close()
    return MergeResult(Path(out), time.perf_counter() - t0, read, total, len(plan.jobs), files, ex.seed,
                       list(plan.notes), list(plan.ignored))


def _gather(ray: Any, refs: list) -> list:
    """The tasks' results; a task's own error (a submerge error, an OS error) as itself, in one line."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, (SubmergeError, OSError)):
            raise cause from None
        raise ConfigError(f"a Ray merge task failed: {str(e).splitlines()[0][:300]}") from None
    except ray.exceptions.RayError as e:
        raise ConfigError(f"the Ray cluster failed the merge: {str(e).splitlines()[0][:300]}") from None
