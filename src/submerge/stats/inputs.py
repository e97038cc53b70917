"""Running a model on a user's inputs to collect statistics: input files (text, JSONL, JSON, tensors),
batching, loading a local Hugging Face folder, and the checks made before any weight is loaded."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from submerge.errors import CheckpointError, ConfigError

log = logging.getLogger("submerge")


def read_inputs(path: Union[str, Path], field_name: Optional[str] = None) -> Union[list[str], dict]:
    """Calibration inputs from a file: ``.txt`` (one text per line), ``.jsonl`` (a ``text`` field, or
    ``field_name``), ``.json`` (a list of strings) or ``.pt``/``.safetensors`` (ready model inputs:
    ``input_ids`` [+ ``attention_mask``])."""
    from submerge.io.files import checked_file, jsonl_values, read_user_text

    p = Path(path)
    if not os.path.lexists(p):
        raise ConfigError(f"input file {p} does not exist")
    suffix = p.suffix.lower()
    if suffix in (".pt", ".pth", ".safetensors"):
        try:
            checked_file(p, None, "input file")
        except CheckpointError as e:
            raise ConfigError(str(e)) from None
        return _tensor_inputs(p, suffix)
    text = read_user_text(p)
    if suffix == ".jsonl":
        key = field_name or "text"
        out = []
        for n, rec in jsonl_values(text, p):
            if isinstance(rec, str):
                out.append(rec)
            elif isinstance(rec, dict) and isinstance(rec.get(key), str):
                out.append(rec[key])
            else:
                raise ConfigError(f"{p}:{n}: no string field {key!r} (choose one with --field)")
        return out
    if suffix == ".json":
        try:
            rec = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(rec, list) or not all(isinstance(r, str) for r in rec):
            raise ConfigError(f"{p}: expected a JSON list of strings")
        return rec
    return [line for line in text.splitlines() if line.strip()]


def _tensor_inputs(p: Path, suffix: str) -> dict:
    """Ready model inputs: ``input_ids`` [+ ``attention_mask``], 2-D integer tensors of one length."""
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(p))
        else:
            data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files raise many error types
        raise ConfigError(f"{p}: cannot load tensors ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    if isinstance(data, torch.Tensor):
        data = {"input_ids": data}
    if not isinstance(data, dict) or not isinstance(data.get("input_ids"), torch.Tensor):
        raise ConfigError(f"{p}: expected a tensor or a dict with an 'input_ids' tensor")
    ids = data["input_ids"]
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ConfigError(f"{p}: input_ids must be a non-empty 2-D integer tensor [examples, tokens], "
                          f"got {ids.dtype} {list(ids.shape)}")
    if bool((ids < 0).any()):
        raise ConfigError(f"{p}: input_ids holds negative token ids")
    mask = data.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape)):
        raise ConfigError(f"{p}: attention_mask must be a tensor of input_ids' shape {list(ids.shape)}")
    return {k: v for k, v in data.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def text_batches(texts: Sequence[str], tokenizer: Any, batch_size: int = 8,
                 max_length: int = 128) -> Iterator[dict]:
    for s in range(0, len(texts), batch_size):
        yield dict(tokenizer(list(texts[s:s + batch_size]), padding=True, truncation=True,
                             max_length=max_length, return_tensors="pt"))


def tensor_batches(data: dict, n: int, batch_size: int = 8) -> Iterator[dict]:
    for s in range(0, n, batch_size):
        yield {k: v[s:s + batch_size] for k, v in data.items() if isinstance(v, torch.Tensor)}


def check_model_run(model_dir: Path, out_dir: Union[str, Path], inputs: Sequence[Any], overwrite: bool,
                    device: str, what: str, **counts: int) -> torch.device:
    """The checks ``submerge calibrate`` / ``fisher`` make before loading anything: the model folder,
    positive counts, the device, and an OUT that is safe to write (and absent unless ``overwrite``)."""
    from submerge.device import parse_device
    from submerge.io import Checkpoint, check_output_target

    if not Path(model_dir).is_dir():
        raise CheckpointError(f"model folder {model_dir} does not exist")
    Checkpoint(model_dir, label=str(model_dir)).close()  # containment and header checks, before transformers
    for name, value in counts.items():
        if type(value) is not int or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    dev = parse_device(device)
    out = check_output_target(out_dir, [model_dir, *inputs], what)
    if out.exists() and not overwrite:
        raise ConfigError(f"{what} {out_dir} already exists (pass --overwrite to replace it)")
    return dev


def check_token_ids(ids: torch.Tensor, model: Any, source: Any) -> None:
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    if isinstance(vocab, int) and ids.numel() and int(ids.max()) >= vocab:
        raise ConfigError(f"{source}: token id {int(ids.max())} is outside the model's vocabulary ({vocab})")
    positions = max_positions(cfg)
    if positions is not None and ids.shape[1] > positions:
        raise ConfigError(f"{source}: inputs of {ids.shape[1]} tokens are longer than the model's "
                          f"{positions} positions")


def max_positions(cfg: Any) -> Optional[int]:
    """How many tokens the model's position embeddings cover (None when it does not say)."""
    n = getattr(cfg, "max_position_embeddings", None)
    if not isinstance(n, int) or n <= 0:
        return None
    if getattr(cfg, "model_type", None) in ("roberta", "xlm-roberta", "camembert"):  # padding_idx + 1 offset
        n -= 2
    return n


def effective_max_length(max_length: int, cfg: Any) -> int:
    """``max_length`` capped at the model's positions (longer inputs would fail inside the model)."""
    positions = max_positions(cfg)
    if positions is not None and max_length > positions:
        log.info("max_length %d exceeds the model's %d positions; truncating to %d", max_length, positions, positions)
        return positions
    return max_length
