"""Lazy, bounded-memory reading of checkpoints.

A :class:`Checkpoint` indexes every tensor of a model from file headers alone
(safetensors headers are parsed and checked; ``.bin`` files are opened with
``torch.load(mmap=True, weights_only=True)``) and reads one tensor at a time on
demand.  Safetensors data is read with ``pread`` into a fresh buffer rather
than memory-mapped, so the resident memory of a merge is the tensors in flight,
not every page of every input file.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from submerge.errors import CheckpointError
from submerge.io.files import checked_file, is_plain_name, read_small_text
from submerge.io.ledger import record

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024
_CHUNK = 1 << 30


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known without reading its data."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int = 0  # absolute byte offset of the data (safetensors only)
    nbytes: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def parse_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Index a safetensors file from its header, checking it is well formed."""
    path = checked_file(path, None, "safetensors file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > min(_MAX_HEADER, size - 8):
                raise CheckpointError(
                    f"{path}: corrupt safetensors file (header length {hlen} exceeds the file)"
                )
            header = json.loads(f.read(hlen))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + hlen
    data_len = size - data_start
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape, offsets = entry["shape"], entry["data_offsets"]
            if not (isinstance(shape, list) and all(_is_count(s) for s in shape) and isinstance(offsets, list)
                    and len(offsets) == 2 and all(_is_count(v) for v in offsets)):
                raise ValueError
            shape = tuple(shape)
            begin, end = offsets
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name}: {str(entry)[:200]} "
                                  f"(shape and data_offsets must be non-negative integers)") from None
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != numel * itemsize or begin < 0 or end > data_len:
            raise CheckpointError(
                f"{path}: corrupt or truncated file: tensor {name} (shape {list(shape)}, "
                f"{entry['dtype']}) claims bytes {begin}..{end} of {data_len} data bytes"
            )
        out[name] = TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)
    return out


def _is_count(v: object) -> bool:
    return type(v) is int and v >= 0


def _pread_into(fd: int, buf: memoryview, offset: int, path: Path, name: str) -> None:
    done = 0
    total = len(buf)
    while done < total:
        n = os.preadv(fd, [buf[done : done + _CHUNK]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{path}: unexpected end of file while reading tensor {name}")
        done += n


class Checkpoint:
    """One input model: a Hugging Face folder or a single state-dict file.

    Accepted layouts: ``model.safetensors``; sharded safetensors with
    ``model.safetensors.index.json``; ``pytorch_model.bin`` (+ index); or a path to
    one ``.safetensors`` / ``.bin`` / ``.pt`` / ``.pth`` file.
    """

    def __init__(self, path: str | os.PathLike, label: Optional[str] = None):
        self.path = Path(path)
        self.label = label or str(path)
        record(self.path)
        if not self.path.exists():
            raise CheckpointError(
                f"model '{self.label}': path {self.path} does not exist (submerge reads local "
                f"folders and files, and Hub ids org/name[@revision])"
            )
        self.config: Optional[dict[str, Any]] = None
        self.tensors: dict[str, TensorInfo] = {}
        self._torch_files: dict[Path, dict[str, torch.Tensor]] = {}
        self._fds: dict[Path, int] = {}
        if self.path.is_dir():
            self._index_folder()
        else:
            self._index_file(checked_file(self.path, None, f"model '{self.label}'"))
        if not self.tensors:
            raise CheckpointError(f"model '{self.label}': {self.path} holds no tensors")

    # ---------------------------------------------------------------- indexing
    def _index_folder(self) -> None:
        d = self.path
        what = f"model '{self.label}'"
        cfg = d / "config.json"
        if os.path.lexists(cfg):
            try:
                config = json.loads(read_small_text(cfg, d, what))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{what}: {cfg} is not valid JSON ({e})") from None
            except RecursionError:
                raise CheckpointError(f"{what}: {cfg} is nested too deeply") from None
            if not isinstance(config, dict):
                raise CheckpointError(f"{what}: {cfg} must hold a JSON object, got {type(config).__name__}")
            self.config = config
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = d / index_name
            if os.path.lexists(index):
                self._index_sharded(index)
                return
        for single in ("model.safetensors", "pytorch_model.bin"):
            if os.path.lexists(d / single):
                self._index_file(checked_file(d / single, d, what))
                return
        raise CheckpointError(
            f"model '{self.label}': no weights in {d} (looked for model.safetensors, "
            f"model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json)"
        )

    def _index_sharded(self, index: Path) -> None:
        what = f"model '{self.label}'"
        try:
            raw = json.loads(read_small_text(index, self.path, what))
        except (json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{what}: unreadable index {index} ({e})") from None
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{what}: index {index} needs a 'weight_map' object (tensor name -> file name)")
        for name, file in weight_map.items():
            if not is_plain_name(file):
                raise CheckpointError(f"{what}: {index.name} maps tensor {name} to {file!r}; index entries must "
                                      f"be plain file names inside the model folder")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            p = index.parent / shard
            if not os.path.lexists(p):
                raise CheckpointError(f"{what}: shard {p} named in {index.name} is missing")
            infos = self._file_infos(checked_file(p, self.path, what))
            for name, file in weight_map.items():
                if file == shard:
                    if name not in infos:
                        raise CheckpointError(
                            f"model '{self.label}': {index.name} maps tensor {name} to {shard}, "
                            f"which does not contain it"
                        )
                    self.tensors[name] = infos[name]

    def _index_file(self, path: Path) -> None:
        self.tensors.update(self._file_infos(path))

    def _file_infos(self, path: Path) -> dict[str, TensorInfo]:
        if path.suffix == ".safetensors":
            return parse_safetensors_header(path)
        if path.suffix in (".bin", ".pt", ".pth"):
            sd = self._load_torch(path)
            return {
                k: TensorInfo(k, path, v.dtype, tuple(v.shape), 0, v.numel() * v.element_size())
                for k, v in sd.items()
            }
        raise CheckpointError(
            f"model '{self.label}': {path} is neither .safetensors nor .bin/.pt/.pth"
        )

    def _load_torch(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._torch_files:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for corrupt pickles
                raise CheckpointError(f"model '{self.label}': cannot load {path} ({e})") from None
            if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                sd = sd["state_dict"]
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise CheckpointError(f"model '{self.label}': {path} is not a state dict of tensors")
            self._torch_files[path] = sd
        return self._torch_files[path]

    # ---------------------------------------------------------------- reading
    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into a fresh CPU tensor of its stored dtype."""
        try:
            info = self.tensors[name]
        except KeyError:
            raise CheckpointError(f"model '{self.label}' has no tensor {name}") from None
        if info.file.suffix != ".safetensors":
            return self._load_torch(info.file)[name].clone()
        out = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            fd = self._fds.get(info.file)
            if fd is None:
                fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
            _pread_into(fd, memoryview(out.numpy()), info.start, info.file, name)
        return out.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._torch_files.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
