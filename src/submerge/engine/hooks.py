"""Post-merge hooks: work the executor runs on the finished model inside the temporary output folder, before it
is renamed into place (so a failure leaves nothing behind).  The plan builds them from the config; the executor
only calls them.  A hook is ``hook(folder, device=..., progress=...) -> note or None`` (the note goes on the card).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

from submerge.engine.config import SurgeryConfig


class PostMerge(Protocol):
    def __call__(self, folder: Path, *, device: str, progress: bool) -> Optional[str]: ...


@dataclass
class SurgeryHook:
    """Representation Surgery (Yang et al., ICML 2024) trained on the written merge: one module per task from
    its expert's folder and its unlabeled inputs file, written as ``surgery.safetensors`` beside the model."""

    settings: SurgeryConfig
    experts: list[tuple[str, Path]]  # (task name, expert folder)
    inputs: list[Path]  # per task, its unlabeled inputs file

    def __call__(self, folder: Path, *, device: str, progress: bool) -> Optional[str]:
        from submerge.routing.surgery import fit_surgery_folders

        sc = self.settings
        done = fit_surgery_folders(folder, self.experts, self.inputs, rank=sc.rank, steps=sc.steps, lr=sc.lr, n=sc.n,
                                   max_length=sc.max_length, batch_size=sc.batch_size, seed=sc.seed,
                                   field_name=sc.field, device=device, progress=progress)
        return ("Representation Surgery: " + ", ".join(
            f"{t} L1 {b:.4f} -> {a:.4f}" for t, (b, a) in zip(done.tasks, done.info["l1_before_after"]))
            + " (surgery.safetensors; submerge.routing.surgery.load_model)")
