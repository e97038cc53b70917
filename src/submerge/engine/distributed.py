"""``submerge merge --backend ray``: one merge spread over a Ray cluster, shard by shard.

The driver plans the merge as a local one does, and cuts the output into the same shards
(:func:`~submerge.io.writer.shard_layout`).  It runs the method's whole-model pass and LiNeS' schedule once,
if the method needs them, and puts the result into the object store. Then it submits one Ray task per shard.
Each task re-plans from the config, reading only headers from storage every node sees. It reads its
shard's inputs, merges them on its GPU or CPU through the same per-tensor step as a local merge (same
per-tensor seeds), and writes that shard's file into the output's temporary folder.  The driver then writes the
index, config, tokenizer, model card and post-merge work.  The folder appears atomically under the same rules
as a local merge: inputs refused as OUT, a lock, finite tensors, nothing left behind on failure.  So the files
are byte for byte a local merge's.

Ray schedules and retries; submerge only submits.  A task whose worker dies is run again (``max_retries``),
and rewriting its shard is idempotent.  A method that keeps a sidecar of every tensor (ESM++'s experts) runs
locally only, for now.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Sequence

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
            state = ex._prepare()
            if ex._lines is not None:
                ex._lines_scales = ex._lines_schedule(state)
            gpus = int(ray.cluster_resources().get("GPU", 0))
            on_gpu = gpus > 0 and opts.device in ("auto", "cuda")
            worker_opts = dataclasses.replace(opts, device="cuda" if on_gpu else "cpu", threads=None)
            task = ray.remote(merge_shard).options(max_retries=3, retry_exceptions=False,
                                                   num_gpus=1 if on_gpu else 0)
            shared = ray.put((state, ex._lines_scales))
            where = str(config_dir) if config_dir is not None else None
            refs = [task.remote(cfg, where, worker_opts, i, str(tmp), ex.seed, shared) for i in range(len(files))]
            read = _gather(ray, refs)
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


def _gather(ray: Any, refs: list) -> int:
    """The tasks' results; a task's own error (a submerge error, an OS error) as itself, in one line."""
    try:
        return sum(ray.get(refs))
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, (SubmergeError, OSError)):
            raise cause from None
        raise ConfigError(f"a Ray merge task failed: {str(e).splitlines()[0][:300]}") from None
    except ray.exceptions.RayError as e:
        raise ConfigError(f"the Ray cluster failed the merge: {str(e).splitlines()[0][:300]}") from None
