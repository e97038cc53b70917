"""The per-tensor step every merge runs: one output tensor from its inputs by a registered method.

Both engines call it: the streaming executor (files in, shards out) and the in-memory merge
(:mod:`submerge.engine.memory`, state dicts in and out, for searches and benchmarks).  What a tensor's merge
means is decided here once: the per-tensor seed (reproducible whatever the order), the
:class:`~submerge.methods.TensorContext` a method sees, an overflow turned into a named error, the shape check,
and LiNeS' rescaling of the update.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from submerge.errors import NonFiniteError, SubmergeError
from submerge.methods import MergeMethod, TensorContext


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed: reproducible whatever order tensors are merged in."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def numeric_params(params: dict) -> dict:
    """Bound parameters without the string-valued ones, for error messages."""
    return {k: v for k, v in params.items() if not isinstance(v, str)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class TensorStep:
    """One method's merge of one tensor at a time.  ``seed`` None: the generator is left unseeded (a method
    that draws nothing); ``state``: what the method's whole-model ``prepare`` pass returned."""

    method: MergeMethod
    seed: Optional[int] = None
    device: torch.device = torch.device("cpu")
    state: Any = None

    def generator(self, name: str) -> torch.Generator:
        gen = torch.Generator(device=self.device if self.device.type != "mps" else torch.device("cpu"))
        if self.seed is not None:
            gen.manual_seed(tensor_seed(self.seed, name))
        return gen

    def __call__(self, name: str, tensors: list[torch.Tensor], base: Optional[torch.Tensor], params: dict, *,
                 model_names: Sequence[str] = (), stats: Optional[Sequence[Any]] = None, staged: Any = None,
                 shape: Optional[Sequence[int]] = None, lines_scale: Optional[float] = None) -> torch.Tensor:
        """The merged tensor (in the compute dtype), then LiNeS' ``lines_scale`` of its update when given."""
        dtype = tensors[0].dtype  # the method may consume its inputs (ctx.tensors[i] = None)
        keep = base.clone() if lines_scale is not None and lines_scale != 1 else None
        ctx = TensorContext(name, tensors, base, self.generator(name), self.state, list(model_names),
                            stats=stats, staged=staged)
        try:
            out = self.method(ctx, **params)
        except RuntimeError as e:
            if "overflow" not in str(e):
                raise
            raise NonFiniteError(
                f"merged tensor {name} has NaN/Inf value(s): the {self.method.name} merge overflowed the compute "
                f"dtype {dtype_name(dtype)} ({e}); check the weights and scales "
                f"({numeric_params(params)}) or use --compute-dtype float64; nothing was written") from None
        if shape is not None and tuple(out.shape) != tuple(shape):
            raise SubmergeError(f"{self.method.name} returned shape {list(out.shape)} for {name}, "
                                f"expected {list(shape)}")
        if keep is not None:
            from submerge.methods.lines import rescale_

            out = rescale_(out, keep, lines_scale)
        return out
