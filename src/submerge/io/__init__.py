"""Checkpoint reading and writing."""

from submerge.io.reader import Checkpoint, TensorInfo, parse_safetensors_header
from submerge.io.writer import ShardWriter, atomic_folder, parse_size

__all__ = ["Checkpoint", "TensorInfo", "ShardWriter", "atomic_folder", "parse_safetensors_header", "parse_size"]
