"""``submerge extract-lora``: a fine-tune's task vector as a PEFT LoRA adapter on its base.

Per linear layer (``nn.Linear``, GPT-2's ``Conv1D``; embeddings with ``embeddings=True``) the task vector
``ΔW = W_ft − W_base`` is replaced by its rank-r truncated SVD ``U_r S_r V_rᵀ``, stored as ``B = U_r S_r^½``,
``A = S_r^½ V_rᵀ`` with ``lora_alpha = r`` (scaling 1), so ``peft.PeftModel.from_pretrained(base, OUT)`` (and
submerge's ``base+OUT``) reproduces ``W_base + U_r S_r V_rᵀ``.  ``rank="auto"`` picks, per layer, the smallest
rank keeping ``energy`` of ‖ΔW‖²_F (written as PEFT's ``rank_pattern`` / ``alpha_pattern``).  SVDs are exact
(float64); with a fixed rank far below the matrix size (8r ≤ min(m, n), min(m, n) ≥ 1024) a randomized SVD
(``torch.svd_lowrank``, 6 power iterations) is used instead, and the kept energy reported is measured on the
factors actually written.  Changes LoRA cannot express (norms, biases, other tensors) are left out and listed
in the model card and the result, with their largest |Δ|.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from submerge.errors import CheckpointError, ConfigError, NonFiniteError
from submerge.io.ledger import one_run
from submerge.io.writer import save_tensors
from submerge.methods.subspace import exact_svd

LOWRANK_MIN_DIM = 1024


@dataclass
class ExtractResult:
    out_dir: Path
    ranks: dict[str, int]
    kept_energy: dict[str, float]  # per module: ‖U_r S_r V_rᵀ‖² / ‖ΔW‖²
    adapter_bytes: int
    finetune_bytes: int
    left_out: dict[str, float] = field(default_factory=dict)  # changed tensors LoRA cannot hold -> max |Δ|


def _module_kinds(config_dir: Path) -> dict[str, str]:
    """Module name -> "linear" | "conv1d" | "embedding", from the architecture built on the meta device."""
    import transformers

    from submerge.io.pretrained import load_pretrained

    cfg = load_pretrained(transformers.AutoConfig, config_dir, quiet=True)
    archs = getattr(cfg, "architectures", None) or [None]
    arch = archs[0] if isinstance(archs, (list, tuple)) else archs
    if arch is not None and not isinstance(arch, str):
        raise CheckpointError(f"{config_dir}: config.json's architectures {str(archs)[:120]} does not name a model "
                              f"class")
    cls = getattr(transformers, arch, None) if arch else None
    if cls is not None and not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"{config_dir}: config.json's architectures names {arch!r}, which is not a "
                              f"transformers model class")
    try:
        with torch.device("meta"):
            model = cls._from_config(cfg) if cls is not None else transformers.AutoModel.from_config(cfg)
    except Exception as e:  # a class for another config type, or a config the class cannot build
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise CheckpointError(f"{config_dir}: cannot build the model config.json describes "
                              f"({arch or cfg.model_type}): {msg}") from None
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            kinds[name] = "linear"
        elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            kinds[name] = "conv1d"
        elif isinstance(module, torch.nn.Embedding):
            kinds[name] = "embedding"
    return kinds


def _finite(t: torch.Tensor, model: Any, name: str) -> torch.Tensor:
    """``t``, checked to hold no NaN or Inf (an adapter of non-finite factors would load, then break)."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteError(f"model '{model}' tensor {name} holds {bad} NaN/Inf value(s); nothing was written")
    return t


def _svd(x: torch.Tensor, rank: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, n = x.shape
    if rank is not None and min(m, n) >= LOWRANK_MIN_DIM and 8 * rank <= min(m, n):
        u, s, v = torch.svd_lowrank(x.double(), q=min(rank + 16, min(m, n)), niter=6)
        return u, s, v.T
    return exact_svd(x)  # the tall side of a wide matrix: the same SVD, 1.2-2.6x faster


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """The smallest r with Σ_{i<r} s_i² ≥ energy · Σ s_i²."""
    e = s.double() ** 2
    total = float(e.sum())
    if total == 0:
        return 0
    cum = torch.cumsum(e, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)).item()) + 1


@one_run
def extract_lora(base: Union[str, Path], finetuned: Union[str, Path], out_dir: Union[str, Path], *,
                 rank: Union[int, str] = 16, energy: float = 0.9, embeddings: bool = False,
                 modules: Optional[str] = None, overwrite: bool = False, progress: bool = False,
                 finetuned_label: Optional[str] = None) -> ExtractResult:
    """Write the task vector ``finetuned − base`` as a PEFT LoRA adapter folder (see the module docstring)."""
    from tqdm.auto import tqdm

    from submerge.io import atomic_folder, check_output_target
    from submerge.io.lora import open_checkpoint
    from submerge.engine.plan import resolve_model_refs

    if rank != "auto" and (type(rank) is not int or rank < 1):
        raise ConfigError(f"rank must be a positive integer or 'auto', got {rank!r}")
    if not 0 < energy <= 1:
        raise ConfigError(f"energy must be in (0, 1], got {energy}")
    try:
        rx = re.compile(modules) if modules else None
    except re.error as e:
        raise ConfigError(f"modules: bad regex {modules!r} ({e})") from None
    paths, revisions = resolve_model_refs([str(base), str(finetuned)], None)
    bpath, fpath = paths[str(base)], paths[str(finetuned)]
    # the card and adapter_config.json name the base as a reader can find it: a Hub id as written, a local
    # folder by its absolute path (a path relative to where extract-lora ran means nothing elsewhere)
    base_name = str(base) if str(base) in revisions or isinstance(bpath, tuple) else str(Path(bpath).resolve())
    check_output_target(out_dir, [bpath, fpath] if not isinstance(bpath, tuple) else [*bpath, fpath], "adapter folder")
    if Path(out_dir).exists() and not overwrite:
        raise ConfigError(f"adapter folder {out_dir} already exists (pass --overwrite to replace it)")
    b_ck, f_ck = open_checkpoint(bpath, str(base)), open_checkpoint(fpath, str(finetuned))
    try:
        if not Path(b_ck.path).is_dir():
            raise CheckpointError(f"base '{base}' must be a Hugging Face folder (its config.json names the layers)")
        kinds = _module_kinds(b_ck.path)
        wanted = {"linear", "conv1d"} | ({"embedding"} if embeddings else set())
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        kept: dict[str, float] = {}
        left_out: dict[str, float] = {}
        fan_in_fan_out = False
        names = [n for n in b_ck.tensors if b_ck.tensors[n].dtype.is_floating_point]
        for name in tqdm(names, desc="extract-lora", disable=not progress):
            if name not in f_ck.tensors:
                raise CheckpointError(f"fine-tune '{finetuned}' lacks tensor {name} of the base")
            bi, fi = b_ck.tensors[name], f_ck.tensors[name]
            if bi.shape != fi.shape:
                raise CheckpointError(f"tensor {name}: base {list(bi.shape)}, fine-tune {list(fi.shape)} (not a "
                                      f"fine-tune of this base?)")
            delta = _finite(f_ck.read(name), finetuned, name).double() - _finite(b_ck.read(name), base, name).double()
            peak = float(delta.abs().max()) if delta.numel() else 0.0
            if peak == 0.0:
                continue
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            kind = kinds.get(module) if module is not None else None
            if kind not in wanted or (rx is not None and not rx.search(module)):
                left_out[name] = peak
                continue
            mat = delta if kind == "linear" else delta.T  # the product B·A each LoRA layer adds
            u, s, vh = _svd(mat, None if rank == "auto" else rank)
            r = rank_for_energy(s, energy) if rank == "auto" else min(rank, s.numel())
            root = s[:r].sqrt()
            b_f, a_f = u[:, :r] * root, root[:, None] * vh[:r]
            total = float((mat ** 2).sum())
            if not (torch.isfinite(a_f).all() and torch.isfinite(b_f).all() and math.isfinite(total)):
                raise NonFiniteError(f"tensor {name}: its LoRA factors are not finite (|Δ| up to {peak:.3g} "
                                     f"overflows the SVD); nothing was written")
            kept[module] = float(((b_f @ a_f) ** 2).sum()) / total if total else 1.0
            ranks[module] = r
            prefix = f"base_model.model.{module}"
            if kind == "embedding":
                tensors[f"{prefix}.lora_embedding_A"] = a_f.float().contiguous()
                tensors[f"{prefix}.lora_embedding_B"] = b_f.float().contiguous()
            else:
                tensors[f"{prefix}.lora_A.weight"] = a_f.float().contiguous()
                tensors[f"{prefix}.lora_B.weight"] = b_f.float().contiguous()
                fan_in_fan_out = fan_in_fan_out or kind == "conv1d"
        if not ranks:
            raise ConfigError(f"'{finetuned}' differs from '{base}' in no layer a LoRA adapter can hold "
                              f"(changed: {sorted(left_out)[:3]})")
        top = max(ranks.values())
        config = {
            "peft_type": "LORA", "r": top, "lora_alpha": top, "target_modules": sorted(ranks),
            "rank_pattern": {m: r for m, r in ranks.items() if r != top},
            "alpha_pattern": {m: r for m, r in ranks.items() if r != top},
            "fan_in_fan_out": fan_in_fan_out, "bias": "none", "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "lora_dropout": 0.0, "init_lora_weights": True, "task_type": None,
            "base_model_name_or_path": base_name,
        }
        adapter_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        ft_bytes = sum(t.nbytes for t in f_ck.tensors.values())
        with atomic_folder(out_dir, overwrite, "adapter folder", inputs=[b_ck.path, f_ck.path],
                           planned_bytes=adapter_bytes) as tmp:
            save_tensors(tensors, tmp / "adapter_model.safetensors", "extract-lora", {"format": "pt"})
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
            _card(tmp / "README.md", base_name, finetuned_label or finetuned, rank, energy, ranks, kept, left_out,
                  adapter_bytes, ft_bytes, revisions)
    finally:
        b_ck.close()
        f_ck.close()
    return ExtractResult(Path(out_dir), ranks, kept, adapter_bytes, ft_bytes, left_out)


def _card(path: Path, base: Any, finetuned: Any, rank: Any, energy: float, ranks: dict[str, int],
          kept: dict[str, float], left_out: dict[str, float], adapter_bytes: int, ft_bytes: int,
          revisions: dict[str, str]) -> None:
    from submerge.version import __version__

    mean_kept = sum(kept.values()) / len(kept)
    worst = min(kept, key=kept.get)
    lines = ["---", "library_name: peft", f"base_model: {base}", "tags:", "- submerge", "- extract-lora", "---", "",
             "# LoRA adapter extracted by submerge", "",
             f"Made with submerge {__version__}: the task vector of `{finetuned}` on `{base}`, per layer the "
             f"truncated SVD at rank {'chosen for ' + str(energy) + ' of the energy' if rank == 'auto' else rank}.",
             "",
             f"- Layers: {len(ranks)}; ranks {min(ranks.values())}–{max(ranks.values())} "
             f"(mean {sum(ranks.values()) / len(ranks):.1f})",
             f"- Kept energy ‖B·A‖²/‖ΔW‖²: mean {mean_kept:.4f}, lowest {kept[worst]:.4f} (`{worst}`)",
             f"- Size: {adapter_bytes / 1e6:.2f} MB, {100 * adapter_bytes / max(ft_bytes, 1):.2f}% of the fine-tune "
             f"({ft_bytes / 1e6:.1f} MB)"]
    for key, rev in revisions.items():
        lines.append(f"- `{key}`: Hub revision `{rev}`")
    if left_out:
        lines.append(f"- Not in the adapter (changed, but not a LoRA-able layer): {len(left_out)} tensor(s), largest "
                     f"|Δ| {max(left_out.values()):.3g}: " + ", ".join(f"`{n}`" for n in sorted(left_out)[:8])
                     + (" ..." if len(left_out) > 8 else ""))
    lines += ["", "| layer | rank | kept energy |", "|---|---:|---:|"]
    lines += [f"| `{m}` | {ranks[m]} | {kept[m]:.4f} |" for m in sorted(kept)]
    path.write_text("\n".join(lines) + "\n")
