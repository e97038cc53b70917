"""The Python API: ``submerge.merge(config, out_dir)`` and ``submerge.validate(config)``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from submerge.engine.config import MergeConfig, load_config, parse_config
from submerge.device import parse_device
from submerge.errors import ConfigError
from submerge.engine.executor import Executor, MergeOptions, MergeResult
from submerge.engine.memory import merge_state_dicts_many  # noqa: F401 (public: in-memory merges)
from submerge.io import check_output_target, parse_size
from submerge.io.ledger import one_run
from submerge.io.lora import split_adapter_ref
from submerge.engine.plan import MergePlan, plan_merge, resolve_model_path

ConfigLike = Union[str, Path, dict, MergeConfig]


def _load(config: ConfigLike) -> tuple[MergeConfig, Optional[Path]]:
    if isinstance(config, (str, Path)):
        p = Path(config)
        return load_config(p), p.resolve().parent
    return parse_config(config), None


def validate(config: ConfigLike, strict: bool = False) -> MergePlan:
    """Check a config against its checkpoints (files, tensors, shapes, parameters) without merging.

    Returns the plan (its ``jobs`` list every output tensor; ``ignored`` the settings mergekit ignores, which
    ``strict=True`` makes errors); raises a :class:`~submerge.errors.SubmergeError` describing the first problem.
    """
    cfg, config_dir = _load(config)
    plan = plan_merge(cfg, config_dir, strict=strict)
    plan.close()
    return plan


@one_run
def merge(config: ConfigLike, out_dir: Union[str, Path], options: Optional[MergeOptions] = None,
          keep_intermediate: Optional[Union[str, Path]] = None, lazy: bool = True, backend: str = "local",
          address: Optional[str] = None, **kwargs: Any) -> MergeResult:
    """Merge the models of ``config`` (a YAML path, a dict or a MergeConfig) into ``out_dir``.

    Keyword arguments set :class:`MergeOptions` fields (``random_seed=0``,
    ``overwrite=True``, ``out_shard_size="2GB"``, ...).  The output is written to
    a temporary sibling folder and renamed at the end: a failed merge leaves
    nothing at ``out_dir``.

    A config file of several YAML documents is a multi-stage merge (mergekit-multimerge's format, see
    :mod:`submerge.engine.stages`): its stages run in order, each into a temporary folder removed at the end, or
    into ``keep_intermediate/<stage name>``, where a later run with the same stage reuses it (``lazy``).

    ``backend="ray"``: the output's shards are merged by Ray tasks (``address``: a running cluster's host:port,
    else a new local instance), files byte for byte the local merge's (:mod:`submerge.engine.distributed`).
    """
    if backend not in ("local", "ray"):
        raise ConfigError(f"unknown backend {backend!r}; use local or ray")
    if backend == "local" and address:
        raise ConfigError("--address is for --backend ray")
    opts = options or MergeOptions()
    if kwargs:
        names = {f.name for f in dataclasses.fields(MergeOptions)}
        unknown = set(kwargs) - names
        if unknown:
            raise ConfigError(f"unknown merge option(s) {sorted(unknown)}; known: {sorted(names)}")
        opts = dataclasses.replace(opts, **kwargs)
    out = Path(out_dir)
    if isinstance(config, (str, Path)):
        from submerge.engine.stages import load_yaml_documents
        from submerge.io.files import read_config_text

        from submerge.engine.config import MAX_CONFIG_BYTES

        docs = load_yaml_documents(read_config_text(Path(config), limit=MAX_CONFIG_BYTES), str(config))
        if len(docs) > 1:
            if backend != "local":
                raise ConfigError("--backend ray does not run multi-stage configs yet; run them locally")
            return _merge_stages(Path(config), docs, out, opts, keep_intermediate, lazy)
    if keep_intermediate is not None:
        raise ConfigError("--keep-intermediate keeps the stages of a multi-stage config (several YAML documents); "
                          "this config has one")
    if isinstance(config, (str, Path)):  # the one document, already read and parsed
        cfg, config_dir = parse_config(docs[0] if docs else None, str(config)), Path(config).resolve().parent
    else:
        cfg, config_dir = _load(config)
    # refuse a dangerous OUT before any checkpoint is opened (the executor checks again, locked)
    inputs = config_inputs(cfg, config_dir) + ([Path(config)] if isinstance(config, (str, Path)) else [])
    check_output_target(out, inputs)
    if out.exists() and not opts.overwrite:
        raise ConfigError(f"output folder {out} already exists (pass --overwrite to replace it)")
    parse_size(opts.out_shard_size)
    parse_device(opts.device)
    if opts.lora_rank is not None:
        if backend != "local":
            raise ConfigError("--lora-rank runs locally only (the adapter is extracted from the whole merge)")
        return _merge_as_lora(cfg, config_dir, out, opts, inputs)
    if backend == "ray":
        from submerge.engine.distributed import merge_on_ray

        return merge_on_ray(cfg, config_dir, opts, out, inputs, address)
    return _execute(cfg, config_dir, opts, out, inputs)


def _execute(cfg: MergeConfig, config_dir: Optional[Path], opts: MergeOptions, out: Path, inputs: list,
             finish=None) -> MergeResult:
    """Plan ``cfg`` against its checkpoints and run the streamed executor into ``out``."""
    plan = plan_merge(cfg, config_dir, strict=opts.strict)
    try:
        executor = Executor(plan, opts)
    except BaseException:
        plan.close()
        raise
    return executor.run(out, inputs, finish=finish)


STAGE_FILE = "submerge_stage.json"  # in a kept stage's folder: what it was made from (a rerun reuses it)


def _merge_stages(path: Path, docs: list, out: Path, opts: MergeOptions, keep: Optional[Union[str, Path]],
                  lazy: bool) -> MergeResult:
    """Run a multi-stage config's stages in order, the final one into ``out``."""
    import json
    import os
    import shutil

    from submerge.engine.stages import plan_stages, used_by, with_stage_paths
    from submerge.io.outdir import stages_folder

    config_dir = path.resolve().parent
    stages = plan_stages(docs, str(path), exists=lambda ref: os.path.lexists(resolve_model_path(ref, config_dir)))
    final = stages[-1]
    if opts.lora_rank is not None:
        raise ConfigError("--lora-rank is not available for multi-stage configs yet")
    check_output_target(out, [path])
    if out.exists() and not opts.overwrite:
        raise ConfigError(f"output folder {out} already exists (pass --overwrite to replace it)")
    needed = used_by(stages, final)
    if keep is not None:
        keep = Path(keep)
        check_output_target(keep, [path])
        if keep.resolve() == out.resolve() or out.resolve() in keep.resolve().parents or \
                keep.resolve() in out.resolve().parents:
            raise ConfigError(f"--keep-intermediate {keep} and the output {out} must not hold one another")
        keep.mkdir(parents=True, exist_ok=True)
    work = keep if keep is not None else stages_folder(out)
    paths: dict[str, str] = {}
    fingerprints: dict[str, str] = {}
    trace: list[str] = []

    def run(stage, dest: Path, stage_opts: MergeOptions, finish) -> MergeResult:
        cfg = with_abs_paths(parse_config(with_stage_paths(stage, paths), f"{path} ({stage.label})"), config_dir)
        return _execute(cfg, None, stage_opts, dest, [path], finish)

    try:
        for st in stages[:-1]:
            fingerprints[st.name] = fp = st.fingerprint(fingerprints)
            dest = work / st.name
            paths[st.name] = str(dest.resolve())
            method = st.raw.get("merge_method", "?")
            if keep is None and st.name not in needed:
                trace.append(f"`{st.name}` ({method}): not used by the final merge, skipped")
                continue
            marker = dest / STAGE_FILE
            if dest.exists() and lazy:
                try:
                    made = json.loads(marker.read_text()).get("fingerprint")
                except (OSError, ValueError):
                    made = None
                if made != fp:
                    raise ConfigError(f"{dest} exists but was not made by stage {st.name} of this config; remove "
                                      f"it, pass --no-lazy to redo it, or keep the stages elsewhere")
                trace.append(f"`{st.name}` ({method}): reused from {dest}")
                continue

            def mark(tmp: Path, fp=fp, st=st) -> None:
                (tmp / STAGE_FILE).write_text(json.dumps({"stage": st.name, "fingerprint": fp,
                                                          "config": st.raw}, indent=2, default=str) + "\n")

            res = run(st, dest, dataclasses.replace(opts, overwrite=dest.exists(), write_card=True), mark)
            trace.append(f"`{st.name}` ({method}, {res.tensors} tensors, {res.seconds:.1f}s): "
                         + (f"kept in {dest}" if keep is not None else "in a temporary folder, removed"))

        def card(tmp: Path) -> None:
            readme = tmp / "README.md"
            if readme.is_file():
                lines = ["", "## Stages", "", f"A multi-stage config ({len(stages)} documents of `{path.name}`), run "
                         "in this order:", ""] + [f"{i + 1}. {t}" for i, t in enumerate(trace)]
                lines += [f"{len(trace) + 1}. the final merge ({final.raw.get('merge_method', '?')}): this model", ""]
                readme.write_text(readme.read_text().rstrip("\n") + "\n" + "\n".join(lines))

        res = run(final, out, opts, card)
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    res.notes.append(f"multi-stage config: {len(trace)} stage(s) before the final merge")
    return res


def _merge_as_lora(cfg: MergeConfig, config_dir: Optional[Path], out: Path, opts: MergeOptions,
                   inputs: list[Path]) -> MergeResult:
    """The merge written as a LoRA adapter on the base: merged into a hidden sibling folder (named like a
    temporary output, so a killed run's copy is cleaned by the next run into OUT), extracted, removed."""
    import os
    import shutil
    import uuid

    from submerge.extract import extract_lora

    if cfg.base_model is None:
        raise ConfigError("--lora-rank writes the merge as an adapter on the base_model; the config names none")
    full = out.parent / f".{out.name}.submerge-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        res = merge(cfg if config_dir is None else with_abs_paths(cfg, config_dir), full,
                    dataclasses.replace(opts, lora_rank=None, overwrite=False, write_card=True))
        ext = extract_lora(_base_ref(cfg, config_dir), full, out, rank=opts.lora_rank, energy=opts.lora_energy,
                           overwrite=opts.overwrite, progress=not opts.quiet,
                           finetuned_label=f"the {cfg.merge_method} merge of {len(cfg.models or cfg.slices or [])} "
                                           f"model(s) (see submerge_config.yaml)")
        (out / "submerge_config.yaml").write_text(cfg.to_yaml())
    finally:
        shutil.rmtree(full, ignore_errors=True)
    mean = sum(ext.kept_energy.values()) / len(ext.kept_energy)
    res.notes.append(f"written as a LoRA adapter on {cfg.base_model}: {len(ext.ranks)} layers, ranks "
                     f"{min(ext.ranks.values())}-{max(ext.ranks.values())}, mean kept energy {mean:.4f}"
                     + (f"; {len(ext.left_out)} changed tensor(s) a LoRA cannot hold" if ext.left_out else ""))
    return dataclasses.replace(res, out_dir=out, bytes_written=ext.adapter_bytes,
                               files=["adapter_model.safetensors", "adapter_config.json", "README.md"])


def with_abs_paths(cfg: MergeConfig, config_dir: Path) -> MergeConfig:
    """Relative model paths of a config file, made absolute (the merge runs from a dict)."""
    raw = cfg.model_dump(exclude_none=True)

    def fix(ref: str) -> str:
        p = resolve_model_path(ref, config_dir)
        return str(p.resolve()) if p.exists() else ref

    if raw.get("base_model"):
        raw["base_model"] = fix(raw["base_model"])
    for m in raw.get("models") or []:
        m["model"] = fix(m["model"])
        if m.get("calibration"):
            m["calibration"] = fix(m["calibration"])
    for sl in raw.get("slices") or []:
        for src in sl["sources"]:
            src["model"] = fix(src["model"])
    out = parse_config(raw)
    out._ignored = list(cfg.ignored)  # the keys dropped when the file was read still belong to its card
    return out


def _base_ref(cfg: MergeConfig, config_dir: Optional[Path]) -> str:
    """The base model reference, resolved like the merge resolves it (a local path first, else as written)."""
    p = resolve_model_path(cfg.base_model, config_dir)
    return str(p) if p.exists() else cfg.base_model


def config_inputs(cfg: MergeConfig, config_dir: Optional[Path]) -> list[Path]:
    """Every local path a config names: models, base, tokenizer source, calibration folders."""
    refs = list(cfg.referenced_models())
    if cfg.tokenizer_source not in (None, "base", "union"):
        refs.append(cfg.tokenizer_source)
    refs += [m.calibration for m in cfg.models or [] if m.calibration]
    refs += list(cfg.surgery.inputs.values()) if cfg.surgery is not None else []
    refs = [part for r in refs for part in (split_adapter_ref(r) or (r,))]  # base+adapter: both are inputs
    return [resolve_model_path(r, config_dir) for r in refs]


def merge_state_dicts(
    method: str,
    base: Optional[Mapping[str, torch.Tensor]],
    models: Sequence[Mapping[str, torch.Tensor]],
    parameters: Optional[dict] = None,
    model_parameters: Optional[Sequence[Optional[dict]]] = None,
    *,
    stats: Optional[Sequence[Any]] = None,
    random_seed: int = 0,
    compute_dtype: torch.dtype = torch.float32,
    lines: Any = None,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts with a registered method (no files).

    ``parameters`` are global values (``{"lambda": 0.5}``), ``model_parameters`` one
    dict per model (``[{"weight": 1.0, "density": 0.2}, ...]``); a per-model parameter
    given in ``parameters`` applies to every model.  Inputs are not modified; each
    output tensor has the base's (else the first model's) dtype.  Non-floating tensors
    are copied from the base.  Meant for search loops (benchmarks, scale selection).
    ``stats`` gives data-based methods (esm, regmean) one calibration source per model: a
    :class:`~submerge.stats.gram.CalibrationStats` or a folder written by ``submerge calibrate``.
    ``lines`` (``{"beta": b}`` or ``{"beta": b, "alpha": a}``, or a :class:`~submerge.methods.lines.Lines`)
    rescales the merged update block by block (LiNeS, as the config's ``lines:``).
    """
    return merge_state_dicts_many(method, base, models, [parameters], model_parameters, stats=stats,
                                  random_seed=random_seed, compute_dtype=compute_dtype, lines=lines)[0]
