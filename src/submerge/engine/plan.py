"""Planning a merge: which output tensor comes from which input tensors, with which parameters.

Everything that headers and the config can tell is checked here, before any
tensor is read: paths, file formats, architectures, missing/extra tensors,
shapes, dtypes, the method's input contract and every parameter of every tensor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from submerge.engine.config import InputSlice, MergeConfig, OutputSlice, evaluate_setting, with_hints
from submerge.errors import CheckpointError, ConfigError, suggest
from submerge.io import Checkpoint
from submerge.io.files import GENERATION_FILES, TOKENIZER_FILES, checked_file
from submerge.io.lora import AdaptedCheckpoint, open_checkpoint
from submerge.layers import layer_structure
from submerge.methods import MergeMethod, get_method
from submerge.methods.subspace import is_embedding


@dataclass
class MergeOptions:
    """How to run a merge (what to merge is the config)."""

    out_shard_size: int | str = "5GB"
    compute_dtype: str = "float32"
    device: str = "cpu"
    threads: Optional[int] = None
    random_seed: Optional[int] = None
    overwrite: bool = False
    quiet: bool = False
    prefetch: bool = True
    copy_tokenizer: bool = True
    write_card: bool = True
    scale_note: str = ""  # how the scale (lambda / alpha) was chosen, for the model card
    lora_rank: Optional[int | str] = None  # write the merge as a LoRA adapter on the base (int rank or "auto")
    lora_energy: float = 0.9  # with lora_rank="auto": the share of each layer's ||dW||^2 kept
    strict: bool = False  # what mergekit ignores (unknown keys, parameters the method does not read) is an error


_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_PRE_HINTS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type")


@dataclass
class TensorJob:
    """One output tensor: its inputs, base, layer position and resolved parameters."""

    out_name: str
    inputs: list[tuple[str, str]]  # (model key, tensor name), non-base inputs in config order
    base: Optional[tuple[str, str]]
    params: dict[str, Any]
    t: float
    copy_from: Optional[tuple[str, str]] = None  # non-floating tensors are copied, not merged
    shape: tuple[int, ...] = ()
    in_dtype: Optional[torch.dtype] = None
    nbytes: int = 0
    vocab: bool = False  # token-indexed: the inputs are re-indexed to the output vocabulary before merging


@dataclass
class MergePlan:
    config: MergeConfig
    method: MergeMethod
    models: dict[str, Checkpoint]  # key -> opened checkpoint
    reference: str  # the model whose config/dtype the output takes
    jobs: list[TensorJob]
    global_params: dict[str, Any]
    out_config: Optional[dict] = None
    tokenizer_model: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # settings mergekit ignores, ignored with a warning
    stats: dict[str, Any] = field(default_factory=dict)  # model key -> calibration StatsReader
    # (source file, name in the output, is a tokenizer file): checked to be regular files in their folder
    extra_files: list[tuple[Path, str, bool]] = field(default_factory=list)
    revisions: dict[str, str] = field(default_factory=dict)  # Hub id as written -> "repo@commit" it resolved to
    vocab: Optional[Any] = None  # a submerge.engine.vocab.VocabPlan when the vocabularies are merged
    tokenizer: Optional[Any] = None  # a tokenizer object to save (built vocabulary or chat template), else files
    post_merge: list = field(default_factory=list)  # hooks run on the written model (submerge.engine.hooks)

    @property
    def inputs(self) -> list[Path]:
        """Every path this merge reads: the models (tokenizer source included) and statistics folders."""
        paths = [p for ckpt in self.models.values() for p in [ckpt.path, *getattr(ckpt, "extra_paths", [])]]
        paths += [Path(r.path) for r in self.stats.values() if getattr(r, "path", None) is not None]
        return paths

    def input_bytes(self) -> int:
        return sum(
            self.models[k].tensors[n].nbytes
            for job in self.jobs
            for k, n in (job.inputs + ([job.base] if job.base else []))
        )

    def close(self) -> None:
        for ckpt in self.models.values():
            ckpt.close()


def resolve_model_path(ref: str, config_dir: Optional[Path]) -> Path:
    """A local path named by a reference: relative to the working directory, else to the config file
    (the path itself when neither exists; nothing is downloaded)."""
    p = Path(ref).expanduser()
    if p.exists() or p.is_absolute() or config_dir is None:
        return p
    alt = config_dir / p
    return alt if alt.exists() else p


def resolve_model_refs(refs: list[str], config_dir: Optional[Path]) -> tuple[dict[str, Any], dict[str, str]]:
    """Every model reference as a local path: local paths first, then Hub ids (``org/name[@rev]``),
    all of which are checked (no download) before any is downloaded.  ``base+adapter`` (mergekit's LoRA
    syntax) resolves to a ``(base path, adapter path)`` pair.  Returns the paths and, for Hub ids, the
    resolved ``repo@commit``."""
    from submerge.io import hub
    from submerge.io.lora import split_adapter_ref

    parts: dict[str, list[str]] = {}
    for ref in dict.fromkeys(refs):
        pair = None if os.path.lexists(resolve_model_path(ref, config_dir)) else split_adapter_ref(ref)
        parts[ref] = list(pair) if pair else [ref]
    local = {p: resolve_model_path(p, config_dir) for ps in parts.values() for p in ps}
    remote = {p: ident for p, path in local.items()
              if not os.path.lexists(path) and (ident := hub.parse_hub_id(p)) is not None}
    for ident in remote.values():
        hub.preflight(ident)
    resolved, revisions = dict(local), {}
    for p, ident in remote.items():
        resolved[p] = hub.resolve(ident)
        revisions[p] = f"{ident.repo_id}@{hub.commit_of(resolved[p])}"
    paths: dict[str, Any] = {}
    ref_revisions: dict[str, str] = {}
    for ref, ps in parts.items():
        paths[ref] = tuple(resolved[p] for p in ps) if len(ps) == 2 else resolved[ps[0]]
        if any(p in revisions for p in ps):
            ref_revisions[ref] = " + ".join(revisions[p] for p in ps if p in revisions)
    return paths, ref_revisions


def _num_layers(ckpt: Checkpoint, layers: dict[str, tuple[int, str]]) -> int:
    if ckpt.config:
        for key in _LAYER_COUNT_KEYS:
            if isinstance(ckpt.config.get(key), int):
                return ckpt.config[key]
    return 1 + max((i for i, _ in layers.values()), default=-1)


class Planner:
    def __init__(self, config: MergeConfig, config_dir: Optional[Path] = None):
        self.config = config
        self.config_dir = config_dir
        self.method = get_method(config.merge_method)
        self.notes: list[str] = []
        self.ignored: list[str] = list(config.ignored)  # what mergekit ignores: warnings (errors with strict)

    # ----------------------------------------------------------------- params
    def _check_parameter_names(self) -> None:
        """Parameters the method does not read are ignored with a warning, as mergekit ignores them (a likely
        misspelling of one it reads stays an error); a whole-merge parameter set per model is ignored the same
        way (mergekit reads it only globally or per slice)."""
        m = self.method
        names = set(m.param_names)
        per_model = {p.name for p in m.params if p.per_model}

        def check(params: Optional[dict], where: str, model_scope: bool) -> None:
            for key in params or {}:
                if key not in names:
                    hint = suggest(key, names)
                    used = ", ".join(sorted(names)) or "none"
                    if hint:
                        raise ConfigError(
                            f"{where}: parameter '{key}' is not used by {m.name}{hint} (its parameters: {used}); "
                            f"mergekit would ignore it silently: correct it, or remove it"
                        )
                    self.ignored.append(f"{where}: parameter '{key}' is not used by {m.name} (its parameters: "
                                        f"{used}); ignored, as mergekit ignores it")
                elif model_scope and key not in per_model:
                    self.ignored.append(f"{where}: parameter '{key}' of {m.name} applies to the whole merge; set "
                                        f"per model it is ignored, as mergekit ignores it (set it under the "
                                        f"top-level 'parameters', or a slice's)")

        c = self.config
        check(c.parameters, "parameters", False)
        for i, mdl in enumerate(c.models or []):
            check(mdl.parameters, f"models[{i}] ({mdl.model}).parameters", True)
        for i, s in enumerate(c.slices or []):
            check(s.parameters, f"slices[{i}].parameters", False)
            for j, src in enumerate(s.sources):
                check(src.parameters, f"slices[{i}].sources[{j}] ({src.model}).parameters", True)

    def _resolve(self, scopes: list[Optional[dict]], name: str, tensor: str, t: float,
                 where: str) -> Any:
        p = self.method.param(name)
        for scope in scopes:
            if scope and name in scope:
                value = evaluate_setting(scope[name], tensor, t)
                if value is not None:
                    return p.coerce(value, where)
        if p.required:
            raise ConfigError(f"missing required parameter '{name}' of {self.method.name} for {where}")
        return p.default

    # ----------------------------------------------------------------- plan
    def plan(self) -> MergePlan:
        c = self.config
        m = self.method
        self._check_parameter_names()
        if c.lines is not None:
            if not m.needs_base:
                raise ConfigError(f"lines: LiNeS rescales the update a task-vector method makes to the base_model; "
                                  f"{m.name} makes none (use it with task_arithmetic, ties, tsv, iso_cts, esm, ...)")
            if c.slices is not None:
                raise ConfigError("lines: LiNeS scales one stack of blocks; use 'models', not 'slices'")
        keys = c.referenced_models()
        if c.tokenizer is not None:
            if c.tokenizer.source not in ("union", "base", *keys):
                raise ConfigError(f"tokenizer.source {c.tokenizer.source!r} is not one of the merged models "
                                  f"{keys}{suggest(c.tokenizer.source, keys)} (nor 'union' or 'base')")
            for name in c.token_models():
                if name not in keys:
                    raise ConfigError(f"tokenizer.tokens: model {name!r} is not one of the merged models "
                                      f"{keys}{suggest(name, keys)}")
        tok_ref = c.tokenizer_source if c.tokenizer_source not in (None, "base", "union") else None
        paths, self.revisions = resolve_model_refs(keys + ([tok_ref] if tok_ref else []), self.config_dir)
        self.paths = paths
        models: dict[str, Checkpoint] = {}
        try:
            for key in keys:
                models[key] = open_checkpoint(paths[key], key)
            plan = self._plan(models)
            if c.lines is not None:  # a model without a numbered block stack is refused before any tensor is read
                from submerge.methods.lines import block_depths

                block_depths(j.out_name for j in plan.jobs if j.copy_from is None)
            return plan
        except Exception:
            for ckpt in models.values():
                ckpt.close()
            raise

    def _slices(self, models: dict[str, Checkpoint]) -> list[OutputSlice]:
        c = self.config
        if c.slices is not None:
            return c.slices
        sources = []
        for mdl in c.models:
            ckpt = models[mdl.model]
            _, layers = layer_structure(list(ckpt.tensors))
            n = max(_num_layers(ckpt, layers), 1)
            sources.append(InputSlice(model=mdl.model, layer_range=(0, n), parameters=mdl.parameters))
        return [OutputSlice(sources=sources)]

    def _plan(self, models: dict[str, Checkpoint]) -> MergePlan:
        c, m = self.config, self.method
        self._check_architectures(models)
        slices = self._slices(models)
        if c.models is not None:
            lengths = {s.layer_range[1] for s in slices[0].sources}
            if len(lengths) != 1:
                raise CheckpointError(
                    "the models have different numbers of layers: "
                    + ", ".join(f"{s.model}: {s.layer_range[1]}" for s in slices[0].sources)
                )
        reference = c.base_model or slices[0].sources[0].model
        ref = models[reference]
        prefix, ref_layers = layer_structure(list(ref.tensors))
        vocab = self._vocab_plan(models, ref)

        # which models are merged, per slice, and which is the base
        slice_inputs: list[tuple[list[InputSlice], Optional[str]]] = []
        role = m.base_role
        for i, s in enumerate(slices):
            base = s.base_model or c.base_model
            if role == "required" and base is None:
                raise ConfigError(f"{m.name} needs a base_model (the model the others were fine-tuned from)")
            uses_base = base is not None and role in ("required", "optional")
            srcs = [src for src in s.sources if not (uses_base and src.model == base)]
            if uses_base and base not in {src.model for src in s.sources} and c.slices is not None:
                raise ConfigError(f"slices[{i}]: the base model {base} must be one of the slice's sources")
            if (role == "input" and base is not None and c.slices is None
                    and base not in {src.model for src in s.sources}):
                # mergekit adds a base_model that is not among the models as one more input
                ckpt = models[base]
                n_layers = max(_num_layers(ckpt, layer_structure(list(ckpt.tensors))[1]), 1)
                srcs = srcs + [InputSlice(model=base, layer_range=(0, n_layers))]
            n = len(srcs)
            if n < m.min_models or (m.max_models is not None and n > m.max_models):
                want = (f"exactly {m.min_models}" if m.max_models == m.min_models
                        else f"at least {m.min_models}" + (f" and at most {m.max_models}" if m.max_models else ""))
                raise ConfigError(
                    f"{m.name} merges {want} model(s){' besides the base' if uses_base else ''}; "
                    f"got {n}: {[s.model for s in srcs]}"
                )
            slice_inputs.append((srcs, base if uses_base else None))

        base_range = {}
        for s in slices:
            for src in s.sources:
                base_range.setdefault(src.model, src.layer_range)

        jobs: list[TensorJob] = []

        def add_job(out_name: str, in_name_for, s_index: int, t: float) -> None:
            s = slices[s_index]
            srcs, base = slice_inputs[s_index]
            src_by_model = {src.model: src for src in s.sources}
            inputs = [(src.model, in_name_for(src.model, src)) for src in srcs]
            base_in = (base, in_name_for(base, src_by_model.get(base))) if base else None
            all_in = inputs + ([base_in] if base_in else [])
            is_vocab = vocab is not None and all(n in vocab.tensors for _, n in all_in)
            first_info = None
            for key, name in all_in:
                ckpt = models[key]
                ti = ckpt.tensors.get(name)
                if ti is None:
                    raise CheckpointError(
                        f"model '{key}' is missing tensor {name}{suggest(name, ckpt.tensors)}"
                    )
                if first_info is None:
                    first_info = (key, ti)
                elif is_vocab and ti.shape[1:] != first_info[1].shape[1:]:
                    raise CheckpointError(
                        f"shape mismatch for tensor {name}: model '{first_info[0]}' has "
                        f"{list(first_info[1].shape)}, model '{key}' has {list(ti.shape)} "
                        f"(token rows may differ, the other dimensions may not)")
                elif not is_vocab and ti.shape != first_info[1].shape:
                    raise CheckpointError(
                        f"shape mismatch for tensor {name}: model '{first_info[0]}' has "
                        f"{list(first_info[1].shape)}, model '{key}' has {list(ti.shape)}"
                    )
                elif ti.dtype != first_info[1].dtype:
                    raise CheckpointError(
                        f"dtype mismatch for tensor {name}: model '{first_info[0]}' stores "
                        f"{first_info[1].dtype}, model '{key}' stores {ti.dtype} (convert one of them)"
                    )
            assert first_info is not None
            ti = first_info[1]
            if is_vocab and ti.dtype.is_floating_point:
                missing = vocab.needs_models() - {k for k, _ in all_in}
                if missing and vocab.settings:
                    raise ConfigError(f"tokenizer.tokens: model(s) {sorted(missing)} are not inputs of tensor "
                                      f"{out_name}; a token's row can only come from a merged model")
            out_shape = (vocab.size, *ti.shape[1:]) if is_vocab else ti.shape
            if not ti.dtype.is_floating_point:
                jobs.append(TensorJob(out_name, [], None, {}, t, copy_from=all_in[-1] if base_in else all_in[0],
                                      shape=ti.shape, in_dtype=ti.dtype, nbytes=ti.nbytes))
                return
            params: dict[str, Any] = {}
            for p in m.params:
                if not p.per_model:
                    params[p.name] = self._resolve([s.parameters, c.parameters], p.name, out_name, t,
                                                   f"tensor {out_name}")
                    continue
                params[p.name] = [
                    self._resolve([src.parameters, s.parameters, c.parameters], p.name, in_name, t,
                                  f"model '{src.model}' tensor {in_name}")
                    for src, (_, in_name) in zip(srcs, inputs)
                ]
            if m.copy_when is not None and m.copy_when(params) and not is_vocab:
                jobs.append(TensorJob(out_name, [], None, {}, t, copy_from=inputs[0], shape=ti.shape,
                                      in_dtype=ti.dtype, nbytes=ti.nbytes))
                return
            jobs.append(TensorJob(out_name, inputs, base_in, params, t, shape=out_shape,
                                  in_dtype=ti.dtype, nbytes=ti.nbytes, vocab=is_vocab))

        # tensors outside the layer stack (embeddings first, the rest after the layers)
        non_layer = [n for n in ref.tensors if n not in ref_layers]
        pre = [n for n in non_layer if any(h in n for h in _PRE_HINTS)]
        post = [n for n in non_layer if n not in set(pre)]
        same = lambda name: (lambda key, src: name)  # noqa: E731
        for name in pre:
            add_job(name, same(name), 0, 0.0)

        # the layer stack, renumbered consecutively across output slices
        suffixes_by_layer: dict[int, list[str]] = {}
        for name, (idx, suffix) in ref_layers.items():
            suffixes_by_layer.setdefault(idx, []).append(suffix)
        out_layer = 0
        for si, s in enumerate(slices):
            length = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
            ref_src = next((src for src in s.sources if src.model == reference), s.sources[0])
            for off in range(length):
                t = off / (length - 1) if length > 1 else 1.0
                ref_idx = ref_src.layer_range[0] + off
                suffixes = suffixes_by_layer.get(ref_idx)
                if suffixes is None:
                    raise CheckpointError(
                        f"slices[{si}]: model '{ref_src.model}' has no layer {ref_idx} "
                        f"(layer_range {list(ref_src.layer_range)})"
                    )
                for suffix in suffixes:
                    def in_name(key, src, suffix=suffix, off=off):
                        start = src.layer_range[0] if src is not None else base_range.get(key, (0, 0))[0]
                        return f"{prefix}{start + off}{suffix}"
                    add_job(f"{prefix}{out_layer}{suffix}", in_name, si, t)
                out_layer += 1
        for name in post:
            add_job(name, same(name), len(slices) - 1, 0.0)

        if vocab is None and c.slices is not None:
            self._check_one_vocabulary(jobs, ref)

        # tensors that an input has but the reference lacks are an architecture mismatch
        if c.models is not None:
            for key, ckpt in models.items():
                extra = sorted(set(ckpt.tensors) - set(ref.tensors))
                if extra:
                    raise CheckpointError(
                        f"model '{key}' has {len(extra)} tensor(s) that '{reference}' lacks, e.g. "
                        f"{extra[:3]} (different architectures?)"
                    )

        out_config = dict(ref.config) if ref.config else None
        total_layers = out_layer
        if out_config is not None and ref_layers:
            for k in _LAYER_COUNT_KEYS:
                if isinstance(out_config.get(k), int) and out_config[k] != total_layers:
                    out_config[k] = total_layers
        if c.vocab_source in (None, "base", "union"):
            tok = reference
        else:
            tok = c.vocab_source
            if tok not in models:
                models[tok] = open_checkpoint(self.paths[tok], tok)
        tokenizer = self._output_tokenizer(models, tok, vocab)
        if vocab is not None and out_config is not None:
            out_config["vocab_size"] = vocab.size
        self._check_linear_weights(jobs)
        self._check_low_rank_updates(jobs, models)
        extra = self._extra_files(models[reference], GENERATION_FILES, False)
        if tokenizer is None:
            extra += self._extra_files(models[tok], TOKENIZER_FILES, True)
        first = next((j for j in jobs if j.copy_from is None), None)
        global_params = {p.name: first.params[p.name] for p in m.params if not p.per_model} if first else {}
        plan = MergePlan(c, m, models, reference, jobs, global_params, out_config, tok, extra_files=extra,
                         revisions=dict(self.revisions), vocab=vocab, tokenizer=tokenizer,
                         notes=list(self.notes), ignored=list(self.ignored))
        self._open_stats(plan)
        surgery = self._surgery_hook(models)
        if surgery is not None:
            plan.post_merge.append(surgery)
        return plan

    def _surgery_hook(self, models: dict[str, Checkpoint]):
        """``surgery:`` — each merged model's folder (its task) and its unlabeled inputs file, checked now."""
        from submerge.engine.hooks import SurgeryHook

        c = self.config
        if c.surgery is None:
            return None
        experts, files = [], []
        for m in c.models or []:
            if m.model == c.base_model:
                continue
            if getattr(models[m.model], "extra_paths", None):
                raise ConfigError(f"surgery: {m.model} is a base model with an adapter; surgery loads each expert "
                                  f"as a full model folder (merge the adapter into its base first)")
            f = resolve_model_path(c.surgery.inputs[m.model], self.config_dir)
            if not f.is_file():
                raise ConfigError(f"surgery.inputs: {c.surgery.inputs[m.model]} (for {m.model}) is not a file")
            experts.append((Path(m.model).name or m.model, Path(models[m.model].path)))
            files.append(f)
        if len({name for name, _ in experts}) != len(experts):
            raise ConfigError("surgery: two merged models have the same folder name; surgery names tasks by it")
        return SurgeryHook(c.surgery, experts, files)

    def _check_one_vocabulary(self, jobs: list[TensorJob], ref: Checkpoint) -> None:
        """Slices taking the input embeddings from one model and the output head from another must agree on the
        vocabulary: a model whose ``embed_tokens`` and ``lm_head`` have different row counts does not load."""
        from submerge.engine.vocab import vocabulary_tensors

        names = vocabulary_tensors(ref.config, [j.out_name for j in jobs])
        rows = {}
        for j in jobs:
            if j.out_name in names and j.shape:
                src = j.copy_from[0] if j.copy_from is not None else j.inputs[0][0]
                rows[j.out_name] = (int(j.shape[0]), src)
        if len({r for r, _ in rows.values()}) > 1:
            shown = ", ".join(f"{n} {r} rows (from '{src}')" for n, (r, src) in rows.items())
            raise ConfigError(f"the slices' models have different vocabularies: the output would have {shown}, a "
                              f"model transformers cannot load; add a 'tokenizer:' block (source: union, or one of "
                              f"the models) to give every token-indexed tensor one vocabulary")

    def _vocab_plan(self, models: dict[str, Checkpoint], ref: Checkpoint):
        """The merged vocabulary (``tokenizer:`` block or ``tokenizer_source``), or None where none is asked
        for or where re-indexing would change nothing (every input already has the output vocabulary)."""
        from submerge.engine.vocab import build_vocab_plan, vocabulary_tensors

        c = self.config
        source = c.vocab_source
        if source is None:
            return None
        names = vocabulary_tensors(ref.config, list(ref.tensors))
        block = c.tokenizer
        required = block is not None or source == "union"
        if not names:
            if required:
                raise CheckpointError(f"cannot find the token embeddings of '{ref.label}' to merge vocabularies")
            return None
        keys = c.referenced_models()
        ckpts = dict(models)
        if source not in ("union", "base") and source not in ckpts:
            ckpts[source] = open_checkpoint(self.paths[source], source)
            models[source] = ckpts[source]
        plan = build_vocab_plan(source, dict(block.tokens or {}) if block else {},
                                block.pad_to_multiple_of if block else None, keys, c.base_model, ckpts, names,
                                required)
        if plan is None:
            self.notes.append(f"tokenizer_source {source}: no loadable tokenizer; tokenizer files copied as they are")
            return None
        rows = {k: min((ckpts[k].tensors[n].shape[0] for n in names if n in ckpts[k].tensors), default=-1)
                for k in keys}
        if all(plan.identity_for(k, rows[k]) for k in keys):
            return None
        self.notes.extend(plan.notes)
        return plan

    def _output_tokenizer(self, models: dict[str, Checkpoint], tok: str, vocab):
        """The tokenizer object to save (a merged vocabulary and/or a chat template), or None: copy files."""
        from submerge.engine.vocab import load_tokenizer, resolve_chat_template

        c = self.config
        tokenizer = vocab.tokenizer if vocab is not None else None
        if not c.chat_template:
            return tokenizer
        if tokenizer is None:
            tokenizer = load_tokenizer(models[tok].path, tok, required=True)
        others = {}
        if c.chat_template == "auto":
            others = {k: load_tokenizer(models[k].path, k, required=False) for k in c.referenced_models()
                      if models[k].path.is_dir()}
        template = resolve_chat_template(c.chat_template, others)
        if template is not None:
            tokenizer.chat_template = template
        return tokenizer

    def _open_stats(self, plan: MergePlan) -> None:
        """Data-based methods: open each model's calibration folder and check it against the headers."""
        c, m = self.config, self.method
        given = [mdl for mdl in (c.models or []) if mdl.calibration]
        if not m.uses_stats(plan.global_params):
            if given:
                plan.notes.append(f"{m.name} uses no calibration statistics; 'calibration' entries are ignored")
            return
        if c.models is None:
            raise ConfigError(f"{m.name} needs per-model calibration statistics: use 'models:' (not 'slices:') "
                              f"with a 'calibration:' folder for each model")
        from submerge.stats.folder import model_fingerprint
        from submerge.stats.load import check_stats_kind, load_stats

        merged_keys = {k for j in plan.jobs for k, _ in j.inputs}
        for i, mdl in enumerate(c.models):
            if mdl.model not in merged_keys:
                continue
            if not mdl.calibration:
                raise ConfigError(f"models[{i}] ({mdl.model}): {m.name} needs 'calibration: <folder>' "
                                  f"(create it with `submerge calibrate {mdl.model} <inputs> <folder>`)")
            reader = load_stats(resolve_model_path(mdl.calibration, self.config_dir))
            check_stats_kind(reader, m.stats_kind, m.name, f"models[{i}] calibration {mdl.calibration}")
            want = reader.info.get("model_fingerprint")
            path = plan.models[mdl.model].path
            if want and path.is_dir() and model_fingerprint(path) != want:
                plan.notes.append(f"calibration {mdl.calibration} was computed on {reader.info.get('model')}, "
                                  f"whose weights differ from {mdl.model}")
            plan.stats[mdl.model] = reader
        missing = []
        for job in plan.jobs:
            if job.copy_from is not None or len(job.shape) != 2:
                continue
            for key, name in job.inputs:
                reader = plan.stats.get(key)
                st_meta = reader.meta_for(name) if reader is not None else None
                if st_meta is None:
                    if name.endswith(".weight") and (key, name) == job.inputs[0]:
                        missing.append(name)
                    continue
                if "shape" in st_meta:
                    if list(st_meta["shape"]) != list(job.shape):
                        raise CheckpointError(
                            f"Fisher {reader.path} has shape {st_meta['shape']} for {name}, but model '{key}' "
                            f"has {list(job.shape)} (computed on another model?)")
                    continue
                d_in = st_meta["d_in"]
                w_in = job.shape[0] if st_meta.get("layout") == "in_out" else job.shape[1]
                if d_in != w_in:
                    raise CheckpointError(
                        f"calibration {reader.path} layer for {name} has inputs of size {d_in}, but model "
                        f"'{key}' tensor {name} has shape {list(job.shape)} (statistics of another model?)")
        if missing:
            plan.notes.append(f"{len(missing)} 2-D weight(s) have no calibration statistics "
                              f"(merged without data), e.g. {missing[:3]}")

    @staticmethod
    def _extra_files(ckpt: Checkpoint, names: tuple[str, ...], tokenizer: bool) -> list[tuple[Path, str, bool]]:
        """The metadata files of a model folder to copy into the output, each checked to be a regular
        file inside the folder (symlinks only within it) before anything is merged."""
        if not ckpt.path.is_dir():
            return []
        out = []
        for name in names:
            src = ckpt.path / name
            if os.path.lexists(src):
                out.append((checked_file(src, ckpt.path, f"model '{ckpt.label}'"), name, tokenizer))
        return out

    def _check_linear_weights(self, jobs: list[TensorJob]) -> None:
        if self.method.name == "linear":
            for job in jobs:
                if job.params.get("normalize") and job.params and sum(job.params["weight"]) == 0:
                    raise ConfigError(f"linear: the weights for tensor {job.out_name} sum to 0, cannot normalize")

    def _check_low_rank_updates(self, jobs: list[TensorJob], models: dict[str, Checkpoint]) -> None:
        """One note where a subspace rule (a method with ``rank_tol``) runs at ``rank_tol`` 0 on LoRA updates of
        lower rank than it keeps: TSV-M, Iso-CTS and ESM keep ⌊min(m, n)/T⌋ or more directions per task, Iso-C all
        of the sum's.  The extra ones are rounding noise from the updates' null spaces, which the SVD picks
        arbitrarily (the module docstring of :mod:`submerge.methods.subspace`)."""
        m = self.method
        if "rank_tol" not in m.param_names:
            return
        hits, ranks, kept = 0, set(), set()
        for job in jobs:
            if job.copy_from is not None or job.base is None or len(job.shape) != 2 or not job.inputs \
                    or (job.params.get("rank_tol") or 0) > 0 \
                    or (job.params.get("embeddings", "mean") == "mean" and is_embedding(job.out_name)):
                continue
            base_path = models[job.base[0]].path
            rs = [models[k].update_rank(n) if isinstance(models[k], AdaptedCheckpoint) and models[k].path == base_path
                  else None for k, n in job.inputs]
            if None in rs:
                continue
            short, T = min(job.shape), len(rs)
            keep = short if m.name == "iso_c" else short // T
            if (sum(rs) if m.name == "iso_c" else max(rs)) < keep:
                hits += 1
                ranks.update(rs)
                kept.add(keep)
        if hits:
            def span(xs: set) -> str:
                return f"{min(xs)}" if len(xs) == 1 else f"{min(xs)}–{max(xs)}"

            what = "of their sum" if m.name == "iso_c" else "per task"
            self.notes.append(
                f"{m.name}: {hits} matrices get LoRA updates of rank {span(ranks)}, but with rank_tol 0 the rule keeps "
                f"{span(kept)} directions {what}; the rest are rounding noise from the updates' null spaces, which "
                f"the SVD picks arbitrarily, so these merged weights can differ between machines; rank_tol: 1e-4 "
                f"keeps only the updates' own directions (README: rank_tol)")

    def _check_architectures(self, models: dict[str, Checkpoint]) -> None:
        seen: Optional[tuple[str, Any, Any]] = None
        for key, ckpt in models.items():
            if not ckpt.config:
                continue
            arch = (ckpt.config.get("architectures"), ckpt.config.get("model_type"))
            if seen is None:
                seen = (key, *arch)
            elif (seen[1], seen[2]) != arch:
                raise CheckpointError(
                    f"different architectures: '{seen[0]}' is {seen[1]} ({seen[2]}), "
                    f"'{key}' is {arch[0]} ({arch[1]}) according to their config.json"
                )


def plan_merge(config: MergeConfig, config_dir: Optional[Path] = None, strict: bool = False) -> MergePlan:
    """The plan of ``config`` (every model opened and checked, no tensor read).  ``strict``: a setting mergekit
    ignores (see :attr:`MergePlan.ignored`) is an error instead of a warning."""
    try:
        plan = Planner(config, config_dir).plan()
    except ConfigError as e:
        raise ConfigError(with_hints(str(e), config.ignored)) from None
    if strict and plan.ignored:
        plan.close()
        more = f" (and {len(plan.ignored) - 1} more)" if len(plan.ignored) > 1 else ""
        raise ConfigError(f"{plan.ignored[0]}{more}; --strict makes this an error")
    return plan
