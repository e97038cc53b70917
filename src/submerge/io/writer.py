"""Sharded safetensors output, streamed to disk tensor by tensor.

Every output tensor's name, dtype and shape are known from the plan before any
math runs, so each shard's safetensors header (with every offset) is written
first and each merged tensor is written straight to its place in the file as
soon as it exists.  No output shard is ever held in memory.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from submerge.errors import ConfigError, NonFiniteError, SubmergeError

_UNITS = {
    "": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_MAX_SIZE = 10**15
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write ``tensors`` (an output of ``what``) when a floating tensor holds NaN or Inf, naming it."""
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(f"{what}: tensor {name} holds {bad} NaN/Inf value(s); nothing was written")


def save_tensors(tensors: dict[str, torch.Tensor], path: os.PathLike | str, what: str,
                 metadata: dict[str, str] | None = None, *, check: bool = True) -> None:
    """The one way a command writes a safetensors file (outside the streamed :class:`ShardWriter`): every floating
    tensor is checked finite first (``check=False`` only for scratch files a run reads back itself)."""
    from safetensors.torch import save_file

    if check:
        check_finite(tensors, what)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())  # safetensors creates its files 0600; outputs are readable as others are


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def parse_size(text: str | int) -> int:
    """Parse a shard size: ``5GB``, ``500M``, ``2GiB``, ``1e9``, or mergekit's ``5B`` (= 5e9 bytes)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if not 1 <= text <= _MAX_SIZE:
            raise ConfigError(f"size must be between 1 byte and 1 PB, got {text!r}")
        return text
    if isinstance(text, bool):
        raise ConfigError(f"cannot parse size {text!r} (examples: 5GB, 500MB, 2GiB)")
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+]?[0-9]{1,3})?)\s*([a-zA-Z]*)\s*", str(text))
    if not m:
        raise ConfigError(f"cannot parse size {text!r} (examples: 5GB, 500MB, 2GiB)")
    number, unit = float(m.group(1)), m.group(2).lower()
    if unit == "b" and m.group(2) == "B" and number < 1000:  # mergekit: '5B' means 5 billion bytes
        mult = 10**9
    elif unit in _UNITS:
        mult = _UNITS[unit]
    else:
        raise ConfigError(f"unknown size unit {m.group(2)!r} in {text!r}")
    value = number * mult
    if not value >= 1 or value > _MAX_SIZE:
        raise ConfigError(f"size must be between 1 byte and 1 PB, got {text!r}")
    size = int(value)
    return size


@dataclass
class _Slot:
    shard: int
    offset: int  # absolute byte offset in the shard file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    written: bool = False


def shard_layout(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int
                 ) -> tuple[list[str], list[list[tuple[str, torch.dtype, tuple[int, ...], int]]]]:
    """How planned tensors are cut into shards, in output order (a shard closes before the tensor that would
    take it past ``max_shard_bytes``; a larger tensor gets its own): the file names and, per shard, its
    ``(name, dtype, shape, bytes)``."""
    groups: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
    size = 0
    for name, dtype, shape in specs:
        n = 1
        for s in shape:
            n *= s
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, dtype, tuple(shape), nbytes))
        size += nbytes
    n_shards = len(groups)
    files = (["model.safetensors"] if n_shards == 1 else
             [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)])
    return files, groups


def write_index(out_dir: Path, files: list[str], shard_of: dict[str, int], total_bytes: int) -> None:
    """``model.safetensors.index.json`` of a sharded output (nothing for one file)."""
    if len(files) > 1:
        weight_map = {name: files[shard_of[name]] for name in sorted(shard_of)}
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (Path(out_dir) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


class ShardWriter:
    """Writes planned tensors into Hugging Face-named safetensors shards.

    ``specs`` lists ``(name, dtype, shape)`` in output order; shards are cut so
    that none exceeds ``max_shard_bytes`` (a single larger tensor gets its own).
    Files are named ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``
    with ``model.safetensors.index.json``.
    """

    def __init__(self, out_dir: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int, only: Optional[int] = None):
        """``only``: write shard ``only`` alone (one worker of a distributed merge); the others are another
        writer's, and :meth:`finish` writes no index (the driver does, :func:`write_index`)."""
        self.out_dir = Path(out_dir)
        self.files, groups = shard_layout(specs, max_shard_bytes)
        self.only = only
        self.slots: dict[str, _Slot] = {}
        self._fds: list[int] = []
        self.total_bytes = 0
        for i, group in enumerate(groups):
            if only is not None and i != only:
                self._fds.append(-1)
                continue
            header: dict = {"__metadata__": {"format": "pt"}}
            pos = 0
            for name, dtype, shape, nbytes in group:
                header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                                "data_offsets": [pos, pos + nbytes]}
                pos += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            start = 8 + len(raw)
            fd = os.open(self.out_dir / self.files[i], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
            os.ftruncate(fd, start + pos)
            for name, dtype, shape, nbytes in group:
                self.slots[name] = _Slot(i, start + header[name]["data_offsets"][0], nbytes, dtype, shape)
                self.total_bytes += nbytes

    def add(self, name: str, tensor: torch.Tensor) -> None:
        slot = self.slots[name]
        if tensor.dtype != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise SubmergeError(
                f"internal: tensor {name} is {tensor.dtype} {list(tensor.shape)}, planned "
                f"{slot.dtype} {list(slot.shape)}"
            )
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data)
        done = 0
        while done < slot.nbytes:
            done += os.pwrite(self._fds[slot.shard], view[done : done + (1 << 30)], slot.offset + done)
        slot.written = True

    def finish(self) -> list[str]:
        """Close the shards, check every tensor was written, write the index; returns file names."""
        missing = [n for n, s in self.slots.items() if not s.written]
        self.close()
        if missing:
            raise SubmergeError(f"internal: {len(missing)} planned tensor(s) were never written, e.g. {missing[:3]}")
        if self.only is None:
            write_index(self.out_dir, self.files, {name: slot.shard for name, slot in self.slots.items()},
                        self.total_bytes)
        return list(self.files)

    def close(self) -> None:
        for fd in self._fds:
            if fd >= 0:
                os.close(fd)
        self._fds.clear()

    abort = close
