"""The streaming executor: for each output tensor, read that tensor from each input, merge, write.

Memory stays near (inputs of one tensor) x 2 (the group being merged and the one
being prefetched) + the pending output shard, whatever the size of the models.
Reading (and the cast to the compute dtype) runs on a background thread while
the current tensor is merged, and full shards are written on another.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from submerge.engine.card import write_model_card
from submerge.device import parse_device
from submerge.errors import ConfigError, NonFiniteError
from submerge.io import ShardWriter, atomic_folder, parse_size
from submerge.io.files import copy_regular_file
from submerge.methods import ModelPass, workspace
from submerge.engine.plan import MergeOptions, MergePlan, TensorJob
from submerge.engine.step import TensorStep, dtype_name, numeric_params

log = logging.getLogger("submerge")

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass
class MergeResult:
    out_dir: Path
    seconds: float
    bytes_read: int
    bytes_written: int
    tensors: int
    files: list[str]
    random_seed: Optional[int] = None
    notes: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # settings mergekit ignores, ignored with a warning


def _check_input_finite(x: torch.Tensor, key: str, name: str) -> None:
    """NaN/Inf in an input tensor is an error naming it.  NaN/Inf propagate through a sum; a non-finite
    sum (or an overflow) gets the exact count."""
    if not bool(torch.isfinite(x.sum(dtype=torch.float32))):
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise NonFiniteError(f"model '{key}' tensor {name} holds {bad} NaN/Inf value(s)")


class Executor:
    def __init__(self, plan: MergePlan, options: MergeOptions):
        self.plan = plan
        self.opt = options
        if options.compute_dtype not in TORCH_DTYPES:
            raise ConfigError(f"unknown compute dtype {options.compute_dtype!r}; use one of {list(TORCH_DTYPES)}")
        self.compute_dtype = TORCH_DTYPES[options.compute_dtype]
        self.device = parse_device(options.device)
        if options.threads is not None and not (type(options.threads) is int and 1 <= options.threads <= 1024):
            raise ConfigError(f"threads must be an integer in 1..1024, got {options.threads!r}")
        if options.random_seed is not None and not (type(options.random_seed) is int
                                                    and 0 <= options.random_seed < 2**63):
            raise ConfigError(f"random_seed must be an integer in 0..2**63-1, got {options.random_seed!r}")
        cfg = plan.config
        out = cfg.out_dtype or cfg.dtype
        self.out_dtype = TORCH_DTYPES[out] if out else None
        self.seed = options.random_seed
        self._read_pool: Optional[ThreadPoolExecutor] = None
        self._scratch: Optional[Path] = None  # spill folder of two-pass methods, inside the temp output
        self._uses_stats = plan.method.uses_stats(plan.global_params)
        self._lines = None
        if cfg.lines is not None:
            from submerge.methods.lines import Lines

            self._lines = Lines.of(cfg.lines.model_dump())
        self._lines_scales: dict[str, float] = {}  # per output tensor, LiNeS' scale of the update
        if plan.method.randomized and self.seed is None:
            self.seed = int.from_bytes(os.urandom(4), "little")
            plan.notes.append(f"no --random-seed given; drew seed {self.seed} (recorded for reproducibility)")

    # ---------------------------------------------------------------- reading
    def _read_compute(self, key: str, name: str) -> torch.Tensor:
        """Read one input tensor, cast it to the compute dtype/device and check it is finite."""
        raw = self.plan.models[key].read(name)
        dtype = torch.float64 if raw.dtype == torch.float64 else self.compute_dtype
        x = raw.to(device=self.device, dtype=dtype)
        del raw
        _check_input_finite(x, key, name)
        return x

    def load(self, job: TensorJob) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
        """Read a job's inputs once each, in the compute dtype; duplicates get their own copy."""
        refs = list(dict.fromkeys(job.inputs + ([job.base] if job.base is not None else [])))
        if self._read_pool is not None and len(refs) > 1:
            cache = dict(zip(refs, self._read_pool.map(lambda r: self._read_compute(*r), refs)))
        else:
            cache = {r: self._read_compute(*r) for r in refs}
        if job.vocab and self.plan.vocab is not None:
            permuted = self.plan.vocab.permute({k: cache[(k, n)] for k, n in refs}, job.out_name)
            cache = {(k, n): permuted[k] for k, n in refs}
        used: set[tuple[str, str]] = set()

        def take(ref: tuple[str, str]) -> torch.Tensor:
            if ref in used:  # the same tensor twice: the method may modify its inputs in place
                return cache[ref].clone()
            used.add(ref)
            return cache[ref]

        base = take(job.base) if job.base is not None else None
        return [take(r) for r in job.inputs], base

    def _iter_loaded(self, jobs: list[TensorJob], stage: Optional[Callable] = None
                     ) -> Iterator[tuple[TensorJob, object]]:
        """Each job with its data, read one job ahead on a prefetch thread: a copied tensor, or
        ``(tensors, base, staged)`` where ``staged`` is what ``stage`` (a method's stage hook) made of the
        inputs — run on the prefetch thread too, so it overlaps the previous job's merge — or None."""

        def fetch(job: TensorJob):
            if job.copy_from is not None:
                return self.plan.models[job.copy_from[0]].read(job.copy_from[1])
            tensors, base = self.load(job)
            return tensors, base, (stage(tensors, base, job.params) if stage is not None else None)

        if not self.opt.prefetch:
            for job in jobs:
                yield job, fetch(job)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="submerge-prefetch") as pool, \
                ThreadPoolExecutor(max_workers=2, thread_name_prefix="submerge-read") as readers:
            self._read_pool = readers
            future = pool.submit(fetch, jobs[0]) if jobs else None
            for i, job in enumerate(jobs):
                data = future.result()
                future = pool.submit(fetch, jobs[i + 1]) if i + 1 < len(jobs) else None
                yield job, data
            self._read_pool = None

    # ---------------------------------------------------------------- merging
    def _prepare(self, only: Optional[Sequence[str]] = None):
        """The method's whole-model pass (None when it has none); ``only``: the method's ``prepare_part`` over
        these tensors (whole layers), for a merge spread over workers."""
        m = self.plan.method
        float_jobs = [j for j in self.plan.jobs if j.copy_from is None]
        if not m.needs_prepare(self.plan.global_params):
            return None
        by_name = {j.out_name: j for j in float_jobs}
        mp = ModelPass(
            [j.out_name for j in float_jobs] if only is None else [n for n in only if n in by_name],
            lambda name: self.load(by_name[name]),
            lambda name: by_name[name].params,
            [k for k, _ in float_jobs[0].inputs] if float_jobs else [],
            stats=(lambda name: self._stats(by_name[name])) if self._uses_stats else None,
            scratch_dir=self._scratch,
        )
        if only is not None:
            return m.prepare_part(mp, self.plan.global_params)
        log.info("%s: whole-model statistics pass", m.name)
        return m.prepare(mp, self.plan.global_params)

    def _stats(self, job: TensorJob) -> Optional[list]:
        """Per input model, the statistics of this tensor (read lazily; None where absent), or None
        when the method reads no statistics."""
        from submerge.stats.load import LazyStats

        if not self._uses_stats:
            return None
        readers = [self.plan.stats.get(key) for key, _ in job.inputs]
        return LazyStats([(r, name) for r, (_, name) in zip(readers, job.inputs)])

    def merge_tensor(self, job: TensorJob, tensors: list[torch.Tensor], base: Optional[torch.Tensor],
                     state, stats: Optional[list] = None, rescale: bool = True, staged=None) -> torch.Tensor:
        """One output tensor by the shared per-tensor step (then LiNeS' scale of its update, unless ``rescale``
        is False); ``staged``: what the method's ``stage`` hook returned for these inputs."""
        step = TensorStep(self.plan.method, self.seed, self.device, state)
        return step(job.out_name, tensors, base, job.params, model_names=[k for k, _ in job.inputs], stats=stats,
                    staged=staged, shape=job.shape,
                    lines_scale=self._lines_scales.get(job.out_name) if rescale else None)

    def _lines_schedule(self, state) -> dict[str, float]:
        """LiNeS' scale per merged tensor; with ``alpha: auto`` one streamed pass first merges every tensor
        for the norms of the summed task vectors and of the method's update (nothing is kept)."""
        from submerge.methods import lines as L

        jobs = [j for j in self.plan.jobs if j.copy_from is None]
        depths, n_blocks = L.block_depths(j.out_name for j in jobs)
        alpha = self._lines.alpha
        if alpha is None:
            sum_sq = update_sq = 0.0
            for job, (tensors, base, _) in self._iter_loaded(jobs):
                acc = torch.zeros_like(base)
                for t in tensors:
                    acc.add_(t).sub_(base)
                sum_sq += L.squared_norm(acc)
                acc.copy_(base)
                merged = self.merge_tensor(job, tensors, base, state, self._stats(job), rescale=False)
                update_sq += L.squared_norm(merged.sub_(acc))
                del tensors, base, merged, acc
            alpha = L.auto_alpha(sum_sq, update_sq, len(jobs[0].inputs) if jobs else 1)
        self.plan.notes.append(self._lines.describe(alpha, n_blocks))
        log.info("%s", self.plan.notes[-1])
        return {name: L.scale_of(d, alpha, self._lines.beta) for name, d in depths.items()}

    def run(self, out_dir: Path, inputs: Sequence[Path] = (),
            finish: Optional[Callable[[Path], None]] = None) -> MergeResult:
        """Merge into ``out_dir`` through :func:`~submerge.io.atomic_folder` (checked against ``inputs``
        and the plan's own inputs, locked, free space checked, swapped in only when complete).  ``finish``
        adds files to the temporary folder before it becomes ``out_dir`` (``submerge tune``'s report)."""
        t0 = time.perf_counter()
        plan, opt = self.plan, self.opt
        if opt.threads:
            torch.set_num_threads(opt.threads)
        bytes_read = 0
        writer = None
        self._log_plan()
        try:
            specs = [(j.out_name, self._out_dtype(j), tuple(j.shape)) for j in plan.jobs]
            shard_size = parse_size(opt.out_shard_size)
            planned = sum(math.prod(shape) * torch.empty((), dtype=dt).element_size() for _, dt, shape in specs)
            with atomic_folder(out_dir, opt.overwrite, "output folder", inputs=[*inputs, *plan.inputs],
                               planned_bytes=planned) as tmp:
                writer = ShardWriter(tmp, specs, shard_size)
                try:
                    bytes_read, files = self._merge_into(tmp, writer)
                finally:
                    writer.close()
                if finish is not None:
                    finish(tmp)
        finally:
            plan.close()
            workspace.release()
        seconds = time.perf_counter() - t0
        log.info("wrote %s: %d file(s), %.1f MB, in %.1f s (%.0f MB read)", out_dir, len(files),
                 writer.total_bytes / 1e6, seconds, bytes_read / 1e6)
        return MergeResult(Path(out_dir), seconds, bytes_read, writer.total_bytes,
                           len(plan.jobs), files, self.seed, list(plan.notes), list(plan.ignored))

    def _log_plan(self) -> None:
        """What ``-v`` shows before any tensor is read: the inputs as resolved, the work, the settings."""
        if not log.isEnabledFor(logging.INFO):
            return
        plan, opt = self.plan, self.opt
        for key, ckpt in plan.models.items():
            role = " (base)" if key == plan.config.base_model else ""
            rev = plan.revisions.get(key)
            log.info("input %s%s: %s%s, %d tensors", key, role, ckpt.path, f" = {rev}" if rev else "",
                     len(ckpt.tensors))
        for key, reader in plan.stats.items():
            log.info("statistics of %s: %s", key, getattr(reader, "path", reader))
        copied = sum(j.copy_from is not None for j in plan.jobs)
        log.info("%s: %d output tensors (%d merged, %d copied), %.1f MB to read; compute %s on %s, %d thread(s); "
                 "output dtype %s, shards up to %s; global parameters %s", plan.method.name, len(plan.jobs),
                 len(plan.jobs) - copied, copied, plan.input_bytes() / 1e6, dtype_name(self.compute_dtype),
                 self.device, torch.get_num_threads(), dtype_name(self.out_dtype) if self.out_dtype else "as input",
                 opt.out_shard_size, plan.global_params or "none")
        for note in plan.notes:
            log.info("note: %s", note)

    def _merge_into(self, tmp: Path, writer: ShardWriter) -> tuple[int, list[str]]:
        plan, opt = self.plan, self.opt
        bytes_read = 0
        self._scratch = tmp / ".scratch"
        state = self._prepare()
        if self._lines is not None:
            self._lines_scales = self._lines_schedule(state)
        side = (plan.method.sidecar(plan.global_params, [k for k, _ in plan.jobs[0].inputs])
                if plan.method.sidecar is not None and plan.jobs else None)
        total = plan.input_bytes()
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=opt.quiet,
                  desc=f"{plan.method.name}", dynamic_ncols=True) as bar:
            # a sidecar copies the inputs before merging: they must reach it as read, so no staging then
            for job, data in self._iter_loaded(plan.jobs, stage=plan.method.stage if side is None else None):
                out, size = self.output(job, data, state, side)
                writer.add(job.out_name, out)
                del out, data
                bytes_read += size
                bar.update(size)
        files = writer.finish()
        if side is not None:
            n_params = sum(math.prod(j.shape) for j in plan.jobs)
            plan.notes.extend(side.finish(tmp, n_params, writer.total_bytes))
        shutil.rmtree(self._scratch, ignore_errors=True)
        self._write_metadata(tmp, files)
        for hook in plan.post_merge:  # post-merge work (Representation Surgery) on the written model, inside the
            note = hook(tmp, device=str(self.device), progress=not opt.quiet)  # folder renamed into place
            if note:
                plan.notes.append(note)
        return bytes_read, files

    def output(self, job: TensorJob, data, state, side=None) -> tuple[torch.Tensor, int]:
        """One output tensor from its loaded ``data`` (see :meth:`_iter_loaded`): copied, or merged, checked
        finite and cast to its output dtype (and handed to the method's sidecar, if any); with the bytes read."""
        if job.copy_from is not None:
            return self._copied(job, data), job.nbytes
        t_job = time.perf_counter()
        tensors, base, staged = data
        size = job.nbytes * (len(job.inputs) + (job.base is not None))
        keep = [t.clone() for t in tensors] if side is not None and side.wants(job.out_name) else None
        keep_base = base.clone() if keep is not None and base is not None else None
        stats = self._stats(job)
        merged = self.merge_tensor(job, tensors, base, state, stats, staged=staged)
        del tensors, base, staged
        self._check_finite(job, merged, self._out_dtype(job))
        out = merged.to(device="cpu", dtype=self._out_dtype(job))
        del merged
        if keep is not None:
            side.add(job.out_name, out, keep, stats, base=keep_base, params=job.params)
        log.debug("%s %s from %d input(s)%s, %s: %.3f s", job.out_name, list(job.shape),
                  len(job.inputs), " + base" if job.base is not None else "",
                  numeric_params(job.params) or "no parameters", time.perf_counter() - t_job)
        return out, size

    def _check_finite(self, job: TensorJob, merged: torch.Tensor, out_dtype: torch.dtype) -> None:
        """Never write a broken model: every merged tensor must be finite in the output dtype.

        One min/max pass over the merged tensor (before the cast, in the compute dtype): a NaN/Inf there,
        or a magnitude beyond the output dtype's largest finite value (which the cast would turn into
        Inf), fails with the tensor's name and the likely cause."""
        if merged.numel() == 0:
            return
        lo, hi = torch.aminmax(merged)
        peak = max(-float(lo), float(hi))
        limit = torch.finfo(out_dtype).max
        if math.isfinite(peak) and peak <= limit:
            return
        if math.isfinite(peak):
            bad = int((merged.abs() > limit).sum())
            cause = (f"its values (largest |x| = {peak:.3g}) exceed the range of the output dtype "
                     f"{dtype_name(out_dtype)} (max {limit:.3g}); use a wider dtype or smaller weights/scales")
        else:
            bad = int((~torch.isfinite(merged)).sum())
            cause = (f"the {self.plan.method.name} merge overflowed or divided by ~0 in the compute dtype "
                     f"{dtype_name(merged.dtype)} (inputs are finite); check the weights and scales "
                     f"({numeric_params(job.params)}) or use --compute-dtype float64")
        what = "value(s) that would be Inf" if math.isfinite(peak) else "NaN/Inf value(s)"
        raise NonFiniteError(f"merged tensor {job.out_name} has {bad} {what}: {cause}; nothing was written")

    def _out_dtype(self, job: TensorJob) -> torch.dtype:
        if self.out_dtype is None or not job.in_dtype.is_floating_point:
            return job.in_dtype
        return self.out_dtype

    def _copied(self, job: TensorJob, data: torch.Tensor) -> torch.Tensor:
        """A tensor copied from one input (buffers; passthrough): float ones checked finite, then cast."""
        if not data.is_floating_point():
            return data
        _check_input_finite(data, *job.copy_from)
        out_dtype = self._out_dtype(job)
        if out_dtype == data.dtype:
            return data
        self._check_finite(job, data, out_dtype)
        return data.to(out_dtype)

    # ---------------------------------------------------------------- metadata
    def _write_metadata(self, tmp: Path, files: list[str]) -> None:
        plan = self.plan
        if plan.out_config is not None:
            cfg = dict(plan.out_config)
            if self.out_dtype is not None:
                name = str(self.out_dtype).replace("torch.", "")
                keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
                for k in keys:
                    cfg[k] = name
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if plan.tokenizer is not None:  # a merged vocabulary or a chat template: the tokenizer object is saved
            plan.tokenizer.save_pretrained(str(tmp))
        for src, fname, tokenizer in plan.extra_files:
            if tokenizer and not self.opt.copy_tokenizer:
                continue
            copy_regular_file(src, tmp / fname)
        (tmp / "submerge_config.yaml").write_text(plan.config.to_yaml())
        if self.opt.write_card:
            write_model_card(tmp / "README.md", plan, self.opt, self.seed, files)
