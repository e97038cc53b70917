"""Checkpoint reading and writing."""

from submerge.io.outdir import OutputError, atomic_folder, check_output_target
from submerge.io.reader import Checkpoint, TensorInfo, parse_safetensors_header
from submerge.io.writer import ShardWriter, parse_size

__all__ = ["Checkpoint", "TensorInfo", "ShardWriter", "OutputError", "atomic_folder", "check_output_target",
           "parse_safetensors_header", "parse_size"]
