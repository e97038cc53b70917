"""TALL-mask compression at inference: one multi-task model, one bit per parameter and task.

A folder written by ``merge_method: tall_masks`` holds the multi-task model ``θ_0 + τ_MTL`` and, beside it,
``tall_masks.safetensors`` (per task and tensor, the mask as packed bits) + ``tall_masks.json`` (tasks, their
λ_t, shapes).  Task t's model is ``θ_0 + m_t ⊙ (θ_MTL − θ_0)``: :func:`task_state` builds its state dict,
:func:`apply_task` loads it into a module.  The task id must be known (the paper's setting)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from submerge.errors import CheckpointError, ConfigError
from submerge.io.writer import save_tensors

MASKS_FILE, INFO_FILE = "tall_masks.safetensors", "tall_masks.json"
_KEY = "tall_mask."  # key prefix in the mask file (never mistaken for a model tensor)


class TallMasks:
    """Per task, a boolean mask for every masked tensor, stored as packed bits."""

    def __init__(self, tasks: Sequence[str], lambdas: Optional[Sequence[float]] = None):
        self.tasks = list(tasks)
        self.lambdas = list(lambdas) if lambdas is not None else None
        self.packed: dict[str, torch.Tensor] = {}  # tensor name -> uint8 [T, ceil(n / 8)]
        self.shapes: dict[str, list[int]] = {}

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def add(self, name: str, masks: torch.Tensor, lambdas: Optional[Sequence[float]] = None) -> None:
        """Masks ``[T, ...]`` (bool) of tensor ``name``."""
        if masks.shape[0] != len(self.tasks):
            raise ValueError(f"{name}: {masks.shape[0]} masks for {len(self.tasks)} tasks")
        if lambdas is not None:
            self.lambdas = list(map(float, lambdas))
        flat = masks.reshape(len(self.tasks), -1).cpu().numpy()
        self.packed[name] = torch.from_numpy(np.packbits(flat, axis=1))
        self.shapes[name] = list(masks.shape[1:])

    def mask(self, name: str, task: Union[int, str]) -> torch.Tensor:
        """Task ``task``'s boolean mask of tensor ``name``."""
        i = self.index(task)
        shape = self.shapes[name]
        bits = np.unpackbits(self.packed[name][i].numpy(), count=math.prod(shape))
        return torch.from_numpy(bits.astype(bool)).reshape(shape)

    def index(self, task: Union[int, str]) -> int:
        if isinstance(task, int):
            if not 0 <= task < len(self.tasks):
                raise ConfigError(f"task index {task} outside 0..{len(self.tasks) - 1}")
            return task
        if task not in self.tasks:
            raise ConfigError(f"unknown task {task!r}; the masks hold {self.tasks}")
        return self.tasks.index(task)

    def kept_fraction(self) -> dict[str, float]:
        """Per task, the share of masked entries it keeps (packbits pads with zero bits)."""
        kept = np.zeros(len(self.tasks), dtype=np.int64)
        for p in self.packed.values():
            kept += np.unpackbits(p.numpy(), axis=1).sum(axis=1, dtype=np.int64)
        n = max(self.n_params, 1)
        return {t: float(k) / n for t, k in zip(self.tasks, kept)}

    def nbytes(self) -> int:
        return sum(p.numel() for p in self.packed.values())

    def save(self, folder: Union[str, Path]) -> int:
        """Write the two files into ``folder``; returns the mask file's size in bytes."""
        folder = Path(folder)
        save_tensors({_KEY + k: v for k, v in self.packed.items()}, folder / MASKS_FILE, "TALL masks")
        (folder / INFO_FILE).write_text(json.dumps({
            "tasks": self.tasks, "tall_lambda": self.lambdas, "shapes": self.shapes,
            "kept_fraction": self.kept_fraction(), "format": "numpy packbits along each flattened tensor, "
            "one row per task"}, indent=2) + "\n")
        return (folder / MASKS_FILE).stat().st_size

    @classmethod
    def load(cls, folder: Union[str, Path]) -> "TallMasks":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / MASKS_FILE).is_file() or not (folder / INFO_FILE).is_file():
            raise CheckpointError(f"{folder} holds no TALL masks ({MASKS_FILE} + {INFO_FILE}); merge with "
                                  f"merge_method: tall_masks")
        info = json.loads((folder / INFO_FILE).read_text())
        out = cls(info["tasks"], info.get("tall_lambda"))
        out.packed = {k[len(_KEY):]: v for k, v in load_file(str(folder / MASKS_FILE)).items() if k.startswith(_KEY)}
        out.shapes = {k: list(v) for k, v in info["shapes"].items()}
        missing = set(out.shapes) ^ set(out.packed)
        if missing:
            raise CheckpointError(f"{folder}: {MASKS_FILE} and {INFO_FILE} disagree on tensors {sorted(missing)[:3]}")
        return out


def task_state(merged: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], masks: TallMasks,
               task: Union[int, str]) -> dict[str, torch.Tensor]:
    """Task ``task``'s state dict: ``base + m_t ⊙ (merged − base)`` on the masked tensors, ``merged`` elsewhere."""
    out = dict(merged)
    for name in masks.shapes:
        if name not in merged or name not in base:
            raise CheckpointError(f"tensor {name} of the TALL masks is missing from the "
                                  f"{'merged model' if name not in merged else 'base'}")
        m, b = merged[name], base[name].to(merged[name].dtype)
        out[name] = torch.where(masks.mask(name, task), m, b)
    return out


def apply_task(model: torch.nn.Module, base: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor],
               masks: TallMasks, task: Union[int, str], prefix: str = "") -> torch.nn.Module:
    """Load task ``task``'s weights into ``model`` (state-dict names = the checkpoint's, after ``prefix``)."""
    state = task_state(merged, base, masks, task)
    model.load_state_dict({prefix + k: v for k, v in state.items()}, strict=False)
    return model
