"""Sharded safetensors output, written asynchronously, finalised with a Hugging Face index."""

from __future__ import annotations

import json
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from submerge.errors import ConfigError

_UNITS = {
    "": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """Parse a shard size: ``5GB``, ``500M``, ``2GiB``, ``1e9``, or mergekit's ``5B`` (= 5e9 bytes)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m:
        raise ConfigError(f"cannot parse size {text!r} (examples: 5GB, 500MB, 2GiB)")
    number, unit = float(m.group(1)), m.group(2).lower()
    if unit == "b" and m.group(2) == "B" and number < 1000:  # mergekit: '5B' means 5 billion bytes
        mult = 10**9
    elif unit in _UNITS:
        mult = _UNITS[unit]
    else:
        raise ConfigError(f"unknown size unit {m.group(2)!r} in {text!r}")
    size = int(number * mult)
    if size <= 0:
        raise ConfigError(f"size must be positive, got {text!r}")
    return size


class ShardWriter:
    """Collects output tensors into shards of at most ``max_shard_bytes`` and writes them.

    A full shard is written on a background thread while merging continues (at most
    one write in flight, so at most two shards are ever in memory).  ``finish``
    names the files as Hugging Face does (``model.safetensors`` or
    ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``).
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int, async_write: bool = True):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self._pool = ThreadPoolExecutor(max_workers=1) if async_write else None
        self._future: Optional[Future] = None
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        tensors, self._pending, self._pending_bytes = self._pending, {}, 0
        fname = f"shard-{len(self._shards):05d}.tmp.safetensors"
        self._shards.append((fname, list(tensors)))
        self._wait()
        path = self.out_dir / fname
        if self._pool is None:
            save_file(tensors, str(path), metadata={"format": "pt"})
        else:
            self._future = self._pool.submit(save_file, tensors, str(path), {"format": "pt"})

    def _wait(self) -> None:
        if self._future is not None:
            future, self._future = self._future, None
            future.result()

    def finish(self) -> list[str]:
        """Write what is pending, name the shards and write the index; returns the file names."""
        self._flush()
        self._wait()
        if self._pool is not None:
            self._pool.shutdown()
        n = len(self._shards)
        if n == 1:
            final = ["model.safetensors"]
        else:
            final = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map: dict[str, str] = {}
        for (tmp, names), name in zip(self._shards, final):
            (self.out_dir / tmp).rename(self.out_dir / name)
            for t in names:
                weight_map[t] = name
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return final

    def abort(self) -> None:
        try:
            self._wait()
        except Exception:
            pass
        if self._pool is not None:
            self._pool.shutdown()
