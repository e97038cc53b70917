"""``submerge moe CONFIG OUT``: a mixture of experts from dense fine-tunes of one base (mergekit-moe's job).

The config is mergekit-moe's (:mod:`submerge.moe.config`); the architecture is chosen by mergekit's rules
(:mod:`submerge.moe.arch`); the routers are computed as mergekit computes them (:mod:`submerge.moe.gates`).
The output is written the way every submerge command writes: into a temporary folder beside OUT, checked
against every input the run read (no OUT may hold one), locked, each tensor checked finite, shards streamed a
layer at a time, and swapped in only when complete, with a model card and the config as given
(``mergekit_moe_config.yml``, as mergekit writes it).

Random draws (``gate_mode: random``/``uniform_random``, ``noise_scale``) come from torch's global generator
seeded with ``random_seed`` and happen in mergekit's order, so a seeded run gives mergekit's tensors; without a
seed one is drawn and recorded in the model card.
"""

from __future__ import annotations

import logging
import math
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from submerge.errors import CheckpointError, ConfigError
from submerge.io.ledger import one_run
from submerge.moe.arch import MLP, MoEArch, select_arch
from submerge.moe.config import MoEConfig, MoEExpert, check_moe_config, load_moe_config
from submerge.moe.gates import degenerate_layers, gate_vectors, prompt_tokenizer

log = logging.getLogger(__name__)

_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class MoEOptions:
    out_shard_size: str = "5GB"
    device: str = "cpu"                  # where the hidden-state gates are computed
    random_seed: Optional[int] = None
    copy_tokenizer: bool = True
    overwrite: bool = False
    allow_all_same: bool = False         # mergekit's --i-understand-this-is-not-useful-without-training
    gate_dtype: str = "float32"          # the base model's dtype for hidden-state gates (mergekit: bfloat16)
    strict: bool = False                 # keys mergekit ignores are errors
    write_model_card: bool = True
    quiet: bool = False


@dataclass
class MoEResult:
    out_dir: Path
    architecture: str
    seconds: float
    tensors: int
    bytes_written: int
    seed: int
    files: list[str]
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Out:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    name = str(name).removeprefix("torch.")
    return getattr(torch, _DTYPE_NAMES.get(name, name))


@one_run
def build_moe(config: str | Path | MoEConfig, out_dir: str | Path, options: Optional[MoEOptions] = None,
              config_text: Optional[str] = None) -> MoEResult:
    """Build the MoE ``config`` describes (a mergekit-moe YAML path, or a parsed :class:`MoEConfig`) into
    ``out_dir``."""
    from submerge.engine.plan import resolve_model_refs
    from submerge.io.lora import open_checkpoint

    from submerge.device import parse_device

    opt = options or MoEOptions()
    parse_device(opt.device)  # a bad --device is one line before anything is read
    t0 = time.perf_counter()
    config_dir = None
    if not isinstance(config, MoEConfig):
        from submerge.io.files import read_config_text

        config_dir = Path(config).resolve().parent
        config_text = read_config_text(Path(config))
        config = load_moe_config(config, strict=opt.strict)
    cfg = config
    check_moe_config(cfg, opt.allow_all_same)
    warnings = list(cfg.ignored)
    paths, revisions = resolve_model_refs(cfg.models(), config_dir)
    ckpts: dict[str, Any] = {}
    try:
        for ref in cfg.models():
            ckpts[ref] = open_checkpoint(paths[ref], ref)
        types = [str((ckpts[r].config or {}).get("model_type")) for r in cfg.models()]
        arch = select_arch(cfg, types)
        base_path = paths[cfg.base_model][0] if isinstance(paths[cfg.base_model], tuple) else paths[cfg.base_model]
        from transformers import AutoConfig

        from submerge.io.pretrained import load_pretrained

        base_cfg = load_pretrained(AutoConfig, base_path)
        n_layers, hidden = int(base_cfg.num_hidden_layers), int(base_cfg.hidden_size)
        out_dtype = _dtype(cfg.dtype) or _dtype(getattr(base_cfg, "torch_dtype", None))
        seed = opt.random_seed if opt.random_seed is not None else secrets.randbelow(2**31)
        torch.manual_seed(seed)
        gates = _gates(cfg, ckpts[cfg.base_model], base_path, n_layers, hidden, opt, config_dir)
        for i in degenerate_layers(gates):
            warnings.append(f"layer {i}: the router rows are nearly dependent (condition number > 5): the prompts "
                            "may be too alike, and some experts will rarely be chosen")
        writer_plan = _plan(cfg, arch, ckpts, n_layers, out_dtype)
        out_config = arch.out_config(base_cfg, cfg, str(out_dtype).removeprefix("torch.") if out_dtype else None)
        files, total = _write(cfg, arch, ckpts, gates, writer_plan, out_config, out_dtype, base_path, Path(out_dir),
                              opt, paths, seed, revisions, config_text, warnings)
    finally:
        for c in ckpts.values():
            c.close()
    seconds = time.perf_counter() - t0
    return MoEResult(Path(out_dir), arch.name, seconds, len(writer_plan), total, seed, files, warnings)


def _gates(cfg: MoEConfig, base_ckpt: Any, base_path: Path, n_layers: int, hidden: int,
           opt: MoEOptions, config_dir: Optional[Path]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from submerge.device import parse_device
    from submerge.io.pretrained import load_pretrained

    if cfg.gate_mode == "calibration":
        from submerge.engine.plan import resolve_model_path
        from submerge.moe.gates import calibration_gates
        from submerge.stats.load import check_stats_kind, load_stats

        stats = []
        for e in cfg.gated():
            s = load_stats(resolve_model_path(e.calibration, config_dir))
            check_stats_kind(s, "calibration", "gate_mode calibration", e.source_model)
            stats.append(s)
        return calibration_gates(stats, n_layers, [e.source_model for e in cfg.gated()])

    tokenizer = None
    if cfg.gate_mode not in ("random", "uniform_random"):
        tokenizer = prompt_tokenizer(load_pretrained(AutoTokenizer, base_path, quiet=True))

    def model() -> torch.nn.Module:
        net = load_pretrained(AutoModelForCausalLM, base_path, quiet=True, torch_dtype=_dtype(opt.gate_dtype))
        if getattr(base_ckpt, "adapter", None) is not None:  # base+adapter: the adapted weights
            state = net.state_dict()
            with torch.no_grad():
                for name in base_ckpt.tensors:
                    if name in state:
                        state[name].copy_(base_ckpt.read(name))
        return net.to(parse_device(opt.device)).eval()

    def embed() -> torch.Tensor:
        try:
            return base_ckpt.read("model.embed_tokens.weight")
        except KeyError:
            raise CheckpointError(f"{cfg.base_model}: no model.embed_tokens.weight for gate_mode cheap_embed") from None

    return gate_vectors(cfg, cfg.gated(), n_layers, hidden, model=model, tokenizer=tokenizer, embed=embed)


def _mlp_name(layer: int, param: str) -> str:
    return f"model.layers.{layer}.mlp.{param}.weight"


def _plan(cfg: MoEConfig, arch: MoEArch, ckpts: dict[str, Any], n_layers: int,
          out_dtype: Optional[torch.dtype]) -> list[_Out]:
    """Every output tensor with its dtype and shape, from the inputs' headers (nothing is read yet)."""
    base = ckpts[cfg.base_model]
    n = len(cfg.experts)
    shared = cfg.shared_experts or []
    out: list[_Out] = []

    def info(ref: str, name: str):
        t = ckpts[ref].tensors.get(name)
        if t is None:
            raise CheckpointError(f"model '{ref}' has no tensor {name} (every expert needs each layer's "
                                  f"{', '.join(MLP)})")
        return t

    for name, t in base.tensors.items():
        if ".mlp." not in name:
            out.append(_Out(name, out_dtype or t.dtype, tuple(t.shape)))
    if arch.qkv_bias:
        heads = ckpts[cfg.base_model].config or {}
        for layer in range(n_layers):
            for p in ("q_proj", "k_proj", "v_proj"):
                name = f"model.layers.{layer}.self_attn.{p}.bias"
                if name not in base.tensors:
                    out.append(_Out(name, out_dtype or torch.float32, (_bias_width(heads, p),)))
    for layer in range(n_layers):
        shapes = {}
        for e in cfg.experts + list(shared):
            for p in MLP:
                t = info(e.source_model, _mlp_name(layer, p))
                if shapes.setdefault(p, tuple(t.shape)) != tuple(t.shape):
                    raise CheckpointError(f"{e.source_model}: {_mlp_name(layer, p)} is {list(t.shape)}, another "
                                          f"expert's is {list(shapes[p])}: experts must share one shape")
        dt = out_dtype or info(cfg.experts[0].source_model, _mlp_name(layer, "gate_proj")).dtype
        inter, width = shapes["gate_proj"]
        prefix = f"model.layers.{layer}.mlp"
        if arch.fused:
            out.append(_Out(f"{prefix}.experts.gate_up_proj", dt, (n, 2 * inter, width)))
            out.append(_Out(f"{prefix}.experts.down_proj", dt, (n,) + shapes["down_proj"]))
        else:
            for p in MLP:
                out += [_Out(f"{prefix}.experts.{i}.{p}.weight", dt, shapes[p]) for i in range(n)]
                if shared:
                    out.append(_Out(f"{prefix}.{arch.shared_module}.{p}.weight", dt, shapes[p]))
        out.append(_Out(f"{prefix}.gate.weight", out_dtype or torch.float32, (n, width)))
        if arch.gates_shared:
            out.append(_Out(f"{prefix}.shared_expert_gate.weight", out_dtype or torch.float32, (1, width)))
    return out


def _bias_width(config: dict, proj: str) -> int:
    heads = int(config["num_attention_heads"])
    head_dim = int(config["hidden_size"]) // heads
    kv = int(config.get("num_key_value_heads") or heads)
    return (heads if proj == "q_proj" else kv) * head_dim


def _noised(t: torch.Tensor, expert: MoEExpert, residual: bool) -> torch.Tensor:
    """mergekit's ``noise_and_scale``: Gaussian noise of ``noise_scale`` (drawn now, from the global generator),
    then ``residual_scale`` on the down projection."""
    if expert.noise_scale is not None:
        t = t + torch.randn_like(t) * expert.noise_scale
    if residual and expert.residual_scale is not None:
        t = t * expert.residual_scale
    return t


def _tensors(cfg: MoEConfig, arch: MoEArch, ckpts: dict[str, Any], gates: torch.Tensor, n_layers: int,
             planned: dict[str, _Out]):
    """(name, tensor) of the output, in mergekit's reading order (the order its noise is drawn in)."""
    base = ckpts[cfg.base_model]
    for name in base.tensors:
        if ".mlp." not in name:
            yield name, base.read(name)
    for name, o in planned.items():
        if name.endswith("_proj.bias") and name not in base.tensors:
            yield name, torch.zeros(o.shape, dtype=o.dtype)
    n = len(cfg.experts)
    shared = cfg.shared_experts or []
    for layer in range(n_layers):
        prefix = f"model.layers.{layer}.mlp"
        if arch.fused:
            got: dict[tuple[int, str], torch.Tensor] = {}
            for i, e in enumerate(cfg.experts):
                for p in arch.noise_order:
                    got[i, p] = _noised(ckpts[e.source_model].read(_mlp_name(layer, p)), e, p == "down_proj")
            yield f"{prefix}.experts.gate_up_proj", torch.stack(
                [torch.cat([got[i, "gate_proj"], got[i, "up_proj"]], dim=0) for i in range(n)])
            yield f"{prefix}.experts.down_proj", torch.stack([got[i, "down_proj"] for i in range(n)])
        else:
            for p in arch.noise_order:
                for i, e in enumerate(cfg.experts):
                    t = ckpts[e.source_model].read(_mlp_name(layer, p))
                    yield f"{prefix}.experts.{i}.{p}.weight", _noised(t, e, p == "down_proj")
                for e in shared:
                    t = ckpts[e.source_model].read(_mlp_name(layer, p))
                    yield f"{prefix}.{arch.shared_module}.{p}.weight", _noised(t, e, p == "down_proj")
    for layer in range(n_layers):
        yield f"model.layers.{layer}.mlp.gate.weight", gates[layer, :n].contiguous()
        if arch.gates_shared:
            yield f"model.layers.{layer}.mlp.shared_expert_gate.weight", gates[layer, n:].contiguous()


def _write(cfg: MoEConfig, arch: MoEArch, ckpts: dict[str, Any], gates: torch.Tensor, plan: list[_Out],
           out_config: dict, out_dtype: Optional[torch.dtype], base_path: Path, out_dir: Path, opt: MoEOptions,
           paths: dict[str, Any], seed: int, revisions: dict[str, str], config_text: Optional[str],
           warnings: list[str]) -> tuple[list[str], int]:
    import json

    from submerge.io import atomic_folder
    from submerge.io.files import GENERATION_FILES, TOKENIZER_FILES, checked_file
    from submerge.io.writer import ShardWriter, check_finite, parse_size

    if arch.gates_shared and gates.shape[1] != len(cfg.experts) + 1:
        raise ConfigError("Qwen MoE gates its shared expert: it needs a router row (positive_prompts, or a random "
                          "gate_mode)")
    planned = {o.name: o for o in plan}
    inputs = [p for v in paths.values() for p in (v if isinstance(v, tuple) else (v,))]
    size = sum(math.prod(o.shape) * torch.empty((), dtype=o.dtype).element_size() for o in plan)
    extra: list[tuple[Path, str]] = []
    names = (TOKENIZER_FILES if opt.copy_tokenizer else ()) + GENERATION_FILES
    for name in names:
        src = Path(base_path) / name
        if src.exists():
            extra.append((checked_file(src, Path(base_path), f"model '{cfg.base_model}'"), name))
    with atomic_folder(out_dir, opt.overwrite, "MoE output folder", inputs=inputs, planned_bytes=size) as tmp:
        writer = ShardWriter(tmp, [(o.name, o.dtype, o.shape) for o in plan], parse_size(opt.out_shard_size))
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(plan), desc=f"moe ({arch.name})", disable=opt.quiet, dynamic_ncols=True)
            for name, t in _tensors(cfg, arch, ckpts, gates, len(gates), planned):
                o = planned[name]
                t = t.to(o.dtype)
                check_finite({name: t}, "the MoE")
                writer.add(name, t)
                bar.update()
            bar.close()
            files = writer.finish()
        finally:
            writer.close()
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2, sort_keys=True) + "\n")
        for src, name in extra:
            shutil.copyfile(src, tmp / name)
        if opt.write_model_card:
            if config_text is not None:
                (tmp / "mergekit_moe_config.yml").write_text(config_text)
            (tmp / "README.md").write_text(_card(cfg, arch, plan, files, seed, revisions, warnings, opt))
    return files, writer.total_bytes


def _card(cfg: MoEConfig, arch: MoEArch, plan: list[_Out], files: list[str], seed: int, revisions: dict,
          warnings: list[str], opt: MoEOptions) -> str:
    import yaml

    from submerge.version import __version__

    lines = ["---", "base_model:", f"- {cfg.base_model}", "library_name: transformers", "tags:", "- submerge",
             "- moe", "- mergekit-moe", "---", "", "# Mixture of experts", "",
             f"Made with [submerge](https://pypi.org/project/submerge/) {__version__} (`submerge moe`, "
             "mergekit-moe's config and tensors).", "",
             f"- Architecture: **{arch.name}**; {len(cfg.experts)} experts, {cfg.experts_per_token} per token"
             + (f", {len(cfg.shared_experts)} shared" if cfg.shared_experts else ""),
             f"- Gates: `{cfg.gate_mode}`" + (f" (hidden states in {opt.gate_dtype})" if cfg.gate_mode.startswith(
                 "hidden") else ""),
             f"- Random seed: {seed} (rerun with `--random-seed {seed}` for identical random gates and noise)",
             "", "## Inputs", "", f"- `{cfg.base_model}` (base: attention, embeddings, norms)"
             + (f" — Hub revision `{revisions[cfg.base_model]}`" if cfg.base_model in revisions else "")]
    for i, e in enumerate(cfg.experts):
        rev = f" — Hub revision `{revisions[e.source_model]}`" if e.source_model in revisions else ""
        lines.append(f"- expert {i}: `{e.source_model}`{rev}")
    for e in cfg.shared_experts or []:
        lines.append(f"- shared expert: `{e.source_model}`")
    lines += ["", f"{len(plan)} tensors, in {len(files)} file(s): " + ", ".join(f"`{f}`" for f in files)]
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    raw = cfg.model_dump(exclude={"ignored"}, exclude_none=True)
    lines += ["", "## Configuration", "", "```yaml", yaml.safe_dump(raw, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)

