"""Folders handed to transformers: the one way submerge calls ``from_pretrained``.

transformers opens a folder's files by itself (``config.json``, tokenizer files, weights), so before it
sees a folder, every file in it is held to the rule the engine keeps for the files it reads
(:func:`~submerge.io.files.checked_folder`: regular files, symlinks only within the folder), and the folder
is recorded as an input of the run.  A broken folder is one :class:`~submerge.errors.CheckpointError` line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

from submerge.errors import CheckpointError
from submerge.io.files import checked_folder


def load_pretrained(cls: Any, folder: Union[str, Path], quiet: bool = False, **kwargs: Any) -> Any:
    """``cls.from_pretrained(folder)`` (a transformers Auto or model class) after the folder's containment
    check; ``quiet`` silences transformers' progress bars and warnings.  Auto model classes read weights in
    float32 (unless ``torch_dtype`` is given)."""
    import torch
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    checked_folder(folder, f"model folder {folder}")
    if cls.__name__.startswith("AutoModel"):
        kwargs.setdefault("torch_dtype", torch.float32)
    bar, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    if quiet:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    try:
        return cls.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, json.JSONDecodeError) as e:
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load {folder} with transformers {cls.__name__}: {msg}") from None
    finally:
        if quiet:
            hf_logging.set_verbosity(verbosity)
            if bar:
                hf_logging.enable_progress_bar()
