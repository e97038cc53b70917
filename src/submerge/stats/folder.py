"""The folder format every per-model statistics folder shares (calibration Gram statistics, Fisher):
a JSON manifest naming its format, one safetensors file, and the fingerprint of the model it came from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence, Union

from submerge.errors import CheckpointError


def _is_pos_int(v: Any) -> bool:
    return type(v) is int and v > 0


def save_folder(path: Union[str, Path], tensors: dict, tensor_file: str, manifest_file: str, manifest: dict,
                kind: str, overwrite: bool = False, inputs: Sequence[Any] = ()) -> Path:
    """Write a statistics folder atomically (:func:`submerge.io.atomic_folder`; ``inputs``: paths it must not
    replace or contain): the tensors (checked finite) into ``tensor_file``, then the JSON manifest."""
    from submerge.io import atomic_folder
    from submerge.io.writer import save_tensors

    planned = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_folder(path, overwrite, f"{kind} folder", inputs=inputs, planned_bytes=planned) as tmp:
        save_tensors(tensors, tmp / tensor_file, f"{kind} statistics")
        (tmp / manifest_file).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(path)


def open_folder(path: Path, tensor_file: str, manifest_file: str, fmt: str, kind: str, command: str) -> tuple[dict, Any]:
    """A statistics folder's checked manifest and its tensor file opened lazily (one-line errors naming the
    command that makes such a folder)."""
    mpath = path / manifest_file
    if not mpath.exists() or not (path / tensor_file).exists():
        raise CheckpointError(f"{path} is not a {kind} folder (needs {manifest_file} and {tensor_file}; create one "
                              f"with `{command}`)")
    manifest = read_manifest(mpath, fmt, path)
    return manifest, open_safetensors(path / tensor_file, path)


def read_manifest(path: Path, fmt: str, folder: Path) -> dict:
    """A statistics folder's JSON manifest, checked to be an object of the expected format (one-line errors)."""
    from submerge.io.files import read_small_text

    try:
        manifest = json.loads(read_small_text(path, folder, "statistics folder"))
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt manifest, not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: corrupt manifest (a JSON object expected, got {type(manifest).__name__})")
    if manifest.get("format") != fmt:
        raise CheckpointError(f"{path}: unknown format {str(manifest.get('format'))[:80]!r}, expected {fmt}")
    return manifest


def open_safetensors(path: Path, folder: Path):
    """``safe_open`` on a checked regular file of ``folder``, with a one-line error for a corrupt file."""
    from safetensors import safe_open

    from submerge.io import parse_safetensors_header
    from submerge.io.files import checked_file

    checked_file(path, folder, "statistics folder")
    parse_safetensors_header(path)  # our header checks: offsets inside the file, shapes, dtypes
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def model_fingerprint(path: Union[str, Path]) -> str:
    """A cheap identity of a checkpoint folder: sha256 over its weight files' names, sizes and headers."""
    p = Path(path)
    files = sorted(f for f in (p.iterdir() if p.is_dir() else [p])
                   if f.suffix in (".safetensors", ".bin", ".pt") and f.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 16))
    return h.hexdigest()
