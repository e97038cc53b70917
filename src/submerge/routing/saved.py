"""The saved ESM++ model: a plain Hugging Face folder (the static merge) + ``experts.safetensors`` and
``experts.json`` beside it.  ``transformers`` alone loads the static model and ignores the experts;
:func:`load` loads both and attaches the router."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from submerge.errors import CheckpointError, ConfigError
from submerge.io import atomic_folder
from submerge.io.writer import check_finite
from submerge.routing.experts import ExpertSet
from submerge.routing.runtime import Router, attach


def save(folder: Union[str, Path], model: Any, experts: ExpertSet, *, overwrite: bool = False,
         tokenizer: Any = None) -> Path:
    """Save ``model`` (a transformers PreTrainedModel: the static merge) and its experts, atomically.

    A model with experts attached is saved without them (its original linears are restored for the
    write, then re-attached)."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise ConfigError(f"output folder {folder} already exists (pass overwrite=True to replace it)")
    if not hasattr(model, "save_pretrained"):
        raise ConfigError("save() needs a transformers model (save_pretrained); for another nn.Module save its "
                          "state dict yourself and call ExpertSet.save(folder)")
    router: Optional[Router] = getattr(model, "submerge_router", None)
    settings = None
    if router is not None:
        settings = dict(mode=router.state.mode, top_k=router.state.top_k, temperature=router.state.temperature,
                        global_routing=router.state.global_routing, rule=router.state.rule)
        router.detach()
    try:
        with atomic_folder(folder, overwrite) as tmp:
            check_finite(model.state_dict(), "ESM++ save")
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            experts.save(tmp)
    finally:
        if settings is not None:
            attach(model, experts, **settings)
    return folder


def load(folder: Union[str, Path], model_class: Any = None, *, mode: str = "route", top_k: int = 1,
         temperature: float = 0.05, global_routing: bool = False, device: str = "cpu", rule: str = "auto",
         **from_pretrained: Any) -> nn.Module:
    """Load a saved ESM++ model: the static merge with its experts attached (``model.submerge_router``).

    ``model_class`` defaults to the architecture named in ``config.json`` (else ``AutoModel``)."""
    import transformers

    from submerge.io.pretrained import load_pretrained

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder} has no config.json: not a Hugging Face model folder")
    experts = ExpertSet.load(folder, device=device)
    if model_class is None:
        cfg = load_pretrained(transformers.AutoConfig, folder, quiet=True)
        arch = (getattr(cfg, "architectures", None) or [None])[0]
        model_class = getattr(transformers, arch, None) if isinstance(arch, str) else None
        model_class = model_class or transformers.AutoModel
    model = load_pretrained(model_class, folder, **from_pretrained).to(device).eval()
    attach(model, experts, mode=mode, top_k=top_k, temperature=temperature, global_routing=global_routing, rule=rule)
    return model
