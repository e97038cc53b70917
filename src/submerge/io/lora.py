"""A model given as ``base+adapter`` (mergekit's syntax): a base checkpoint with a PEFT LoRA adapter applied
tensor by tensor while streaming — the full fine-tuned state dict never exists in memory.

For each targeted linear layer ``W' = W + s·B·A`` (``Wᵀ`` updated for ``fan_in_fan_out`` layers such as GPT-2's
Conv1D), with ``s = lora_alpha / r`` (``/ √r`` for rsLoRA; per-module ``alpha_pattern`` matched as PEFT
matches it); embedding adapters add ``s·(B·A)ᵀ``; ``modules_to_save`` and trained biases replace the base's
tensors.  The product is formed in float32 and added to the base tensor in float32, then cast back to its
dtype (PEFT's ``merge_and_unload`` adds in the weight's dtype: identical for float32 models, at most one
rounding apart for bf16/fp16).  DoRA, and adapters other than LoRA, are refused with a clear message.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

from submerge.errors import CheckpointError, quoted
from submerge.io.files import checked_file, read_small_text
from submerge.io.reader import Checkpoint, TensorInfo

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
_LORA_PARTS = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")


def is_adapter_folder(path: Path) -> bool:
    return Path(path).is_dir() and os.path.lexists(Path(path) / CONFIG_FILE)


def _pattern_key(patterns: list[str], module: str) -> Optional[str]:
    """PEFT's rule for rank/alpha patterns: the first key that matches the module name's tail."""
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(patterns, module)
    return key if key in patterns else None


class LoraAdapter:
    """One PEFT LoRA folder, indexed from its config and tensor headers (nothing loaded up front)."""

    def __init__(self, folder: Path, label: str):
        self.folder = Path(folder)
        self.label = label
        what = f"adapter '{label}'"
        try:
            cfg = json.loads(read_small_text(self.folder / CONFIG_FILE, self.folder, what))
        except (json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{what}: {self.folder / CONFIG_FILE} is not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{what}: {CONFIG_FILE} must hold a JSON object")
        kind = str(cfg.get("peft_type", "LORA")).upper()
        if kind != "LORA":
            raise CheckpointError(f"{what}: a {kind} adapter; only LoRA adapters can be merged")
        if cfg.get("use_dora"):
            raise CheckpointError(f"{what}: a DoRA adapter (use_dora); its magnitude vectors need the full weight norm "
                                  f"per column, which submerge does not implement — merge it with "
                                  f"peft's merge_and_unload() first")
        self.alpha = _number(cfg.get("lora_alpha", 8), f"{what}: {CONFIG_FILE}: lora_alpha")
        self.r = _rank(cfg.get("r", 8), f"{what}: {CONFIG_FILE}: r")
        self.rslora = bool(cfg.get("use_rslora", False))
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        self.alpha_pattern = _pattern(cfg.get("alpha_pattern"), "alpha_pattern", _number, what)
        self.rank_pattern = _pattern(cfg.get("rank_pattern"), "rank_pattern", _rank, what)
        self.target_modules = _targets(cfg.get("target_modules"), what)
        self.config = cfg
        weights = next((self.folder / f for f in WEIGHT_FILES if os.path.lexists(self.folder / f)), None)
        if weights is None:
            raise CheckpointError(f"{what}: no adapter_model.safetensors or adapter_model.bin in {self.folder}")
        checked_file(weights, self.folder, what)
        self._ckpt = Checkpoint(weights, label=f"{label} ({weights.name})")
        self.pairs: dict[str, dict[str, str]] = {}  # module -> {"A": key, "B": key, "embedding": bool}
        self.full: dict[str, str] = {}  # base tensor name -> adapter key (modules_to_save, biases)
        for key in self._ckpt.tensors:
            name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            if "lora_magnitude_vector" in name:
                raise CheckpointError(f"{what}: holds DoRA magnitude vectors ({key}); DoRA is not supported")
            part = next((p for p in _LORA_PARTS if p in name), None)
            if part is None:
                for wrapper in (".modules_to_save.default.", ".original_module.", ".base_layer."):
                    name = name.replace(wrapper, ".")
                self.full[name] = key
                continue
            module = name[: name.index(part)]
            slot = self.pairs.setdefault(module, {})
            slot["A" if "_A" in part else "B"] = key
            slot["embedding"] = "embedding" in part
        for module, slot in self.pairs.items():
            if "A" not in slot or "B" not in slot:
                raise CheckpointError(f"{what}: module {module} has only one of lora_A / lora_B")
            if not self.targeted(module):
                raise CheckpointError(f"{what}: {CONFIG_FILE}: target_modules {quoted(cfg.get('target_modules'))} "
                                      f"does not name module {module}, which the adapter's tensors hold (PEFT "
                                      f"would not load it)")

    def targeted(self, module: str) -> bool:
        """Whether ``target_modules`` names ``module`` as PEFT matches it (a regex on the whole name, or a list of
        names each matching the name's tail; None and ``all-linear`` target every linear layer)."""
        t = self.target_modules
        if t is None or t == "all-linear":
            return True
        if isinstance(t, str):
            return re.fullmatch(t, module) is not None
        return any(module == x or module.endswith("." + x) for x in t)

    def rank_of(self, module: str) -> int:
        """The rank the config gives ``module`` (``rank_pattern``, else ``r``): PEFT builds the layer at it."""
        key = _pattern_key(list(self.rank_pattern), module)
        return self.rank_pattern[key] if key is not None else self.r

    def update_shape(self, module: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The header shapes of ``module``'s lora_A and lora_B, checked to be a rank-r pair (no tensor read)."""
        slot, what = self.pairs[module], f"adapter '{self.label}'"
        a, b = (tuple(self._ckpt.tensors[slot[k]].shape) for k in ("A", "B"))
        if len(a) != 2 or len(b) != 2 or b[1] != a[0]:
            raise CheckpointError(f"{what}: module {module} has lora_A {list(a)} and lora_B {list(b)}, which do "
                                  f"not multiply")
        if a[0] != self.rank_of(module):
            raise CheckpointError(f"{what}: module {module} has rank-{a[0]} lora_A/lora_B, but {CONFIG_FILE} gives "
                                  f"it r = {self.rank_of(module)} (PEFT would not load it)")
        return a, b

    def targets(self) -> dict[str, str]:
        """Base tensor name -> the module whose LoRA update it receives."""
        return {f"{m}.weight": m for m in self.pairs}

    def scaling(self, module: str, r: int) -> float:
        key = _pattern_key(list(self.alpha_pattern), module)
        alpha = float(self.alpha_pattern[key]) if key is not None else self.alpha
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    def transposed(self, module: str, shape: tuple[int, ...]) -> bool:
        """Whether ``s·B·A`` is added transposed to a base weight of ``shape`` (embeddings; ``fan_in_fan_out``
        layers such as GPT-2's Conv1D, also where the flag is set per layer type, as PEFT corrects it when it
        loads); an error when the update fits the weight in no orientation.  From the headers: no tensor read."""
        a, b = self.update_shape(module)
        d, dt, shape = (b[0], a[1]), (a[1], b[0]), tuple(shape)
        flip = self.pairs[module]["embedding"] or (self.fan_in_fan_out and dt == shape) or (d != shape and dt == shape)
        if (dt if flip else d) != shape:
            raise CheckpointError(f"adapter '{self.label}': its update of {module} is {list(d)} (lora_B {list(b)} · "
                                  f"lora_A {list(a)}), but the base model's {module}.weight is {list(shape)} (an "
                                  f"adapter for another model?)")
        return flip

    def delta(self, module: str, shape: tuple[int, ...]) -> torch.Tensor:
        """``s·B·A`` of one module as a float32 tensor of the base weight's ``shape``."""
        slot = self.pairs[module]
        a = self._ckpt.read(slot["A"]).float()
        b = self._ckpt.read(slot["B"]).float()
        d = (b @ a) * self.scaling(module, a.shape[0])
        return d.T if self.transposed(module, shape) else d

    def read_full(self, name: str) -> torch.Tensor:
        return self._ckpt.read(self.full[name])

    def close(self) -> None:
        self._ckpt.close()


class AdaptedCheckpoint(Checkpoint):
    """A base :class:`Checkpoint` seen through a LoRA adapter: same tensor index (names, shapes, dtypes from
    the base's headers), each tensor read as the base's plus the adapter's update."""

    def __init__(self, base_path: Path, adapter_path: Path, label: str):
        base_label, _, adapter_label = label.partition("+")
        super().__init__(base_path, label=label)
        self.adapter = LoraAdapter(adapter_path, adapter_label or str(adapter_path))
        self.extra_paths = [Path(adapter_path)]
        self._targets = self.adapter.targets()
        for name, module in self._targets.items():
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(f"adapter '{adapter_label}' targets module {module}, which model "
                                      f"'{base_label}' lacks (no tensor {name})")
            if not info.dtype.is_floating_point:
                raise CheckpointError(f"adapter '{adapter_label}': {name} of '{base_label}' is {info.dtype}, "
                                      f"not a floating tensor (a quantized base?)")
            self.adapter.transposed(module, tuple(info.shape))  # shapes and ranks checked: validate sees them
        for name in self.adapter.full:
            if name not in self.tensors:
                raise CheckpointError(f"adapter '{adapter_label}' stores {name}, which model '{base_label}' lacks")
        shapes = self.adapter._ckpt.tensors
        for name, key in self.adapter.full.items():
            if tuple(shapes[key].shape) != tuple(self.tensors[name].shape):
                raise CheckpointError(f"adapter '{adapter_label}' stores {name} as {list(shapes[key].shape)}, model "
                                      f"'{base_label}' has {list(self.tensors[name].shape)}")

    def update_rank(self, name: str) -> Optional[int]:
        """The rank of the update the adapter adds to the base's tensor ``name`` (its LoRA pair's r); None where the
        adapter leaves the tensor alone or stores it whole (a stored tensor's update need not be low-rank)."""
        module = self._targets.get(name)
        if module is None or name in self.adapter.full:
            return None
        return self.adapter.rank_of(module)

    def read(self, name: str) -> torch.Tensor:
        # a stored full tensor (modules_to_save, a trained bias, an embedding's saved base layer) replaces the
        # base's; a LoRA pair then adds its update on top
        w = self.adapter.read_full(name).to(self.tensors[name].dtype) if name in self.adapter.full else super().read(name)
        module = self._targets.get(name)
        if module is None:
            return w
        return (w.float() + self.adapter.delta(module, tuple(w.shape))).to(w.dtype)

    def close(self) -> None:
        super().close()
        self.adapter.close()


def _number(value: Any, where: str) -> float:
    """A finite number (a JSON int or float), as PEFT needs ``lora_alpha`` to be."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{where} must be a finite number, got {quoted(value)}")
    return float(value)


def _rank(value: Any, where: str) -> int:
    """A positive integer rank (PEFT refuses r <= 0 and builds layers of exactly this size)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{where} must be a positive integer, got {quoted(value)}")
    return value


def _pattern(value: Any, name: str, check: Any, what: str) -> dict:
    """``alpha_pattern`` / ``rank_pattern``: module-name patterns (regular expressions, as PEFT matches them)
    mapped to numbers."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{what}: {CONFIG_FILE}: {name} must map module-name patterns to values, got "
                              f"{quoted(value)}")
    out = {}
    for key, v in value.items():
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error as e:
            raise CheckpointError(f"{what}: {CONFIG_FILE}: {name} key {quoted(key)} is not a valid pattern ({e})") \
                from None
        out[key] = check(v, f"{what}: {CONFIG_FILE}: {name}[{quoted(key)}]")
    return out


def _targets(value: Any, what: str) -> Any:
    """``target_modules``: None, a regular expression, or a list of module names."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise CheckpointError(f"{what}: {CONFIG_FILE}: target_modules {quoted(value)} is not a valid regular "
                                  f"expression ({e})") from None
        return value
    if isinstance(value, list) and all(isinstance(x, str) and x for x in value):
        return list(value)
    raise CheckpointError(f"{what}: {CONFIG_FILE}: target_modules must be a list of module names or a regular "
                          f"expression, got {quoted(value)}")


def split_adapter_ref(ref: str) -> Optional[tuple[str, str]]:
    """mergekit's ``model+adapter`` syntax as ``(model, adapter)``; None for a plain reference."""
    parts = ref.split("+")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        return None
    return parts[0], parts[1]


def open_checkpoint(path: Any, label: str) -> Checkpoint:
    """A checkpoint from a resolved reference: a path, or ``(base path, adapter path)``."""
    if isinstance(path, tuple):
        return AdaptedCheckpoint(path[0], path[1], label)
    return Checkpoint(path, label=label)


__all__ = ["AdaptedCheckpoint", "LoraAdapter", "TensorInfo", "is_adapter_folder", "open_checkpoint",
           "split_adapter_ref"]
