"""Passthrough: one source per output tensor, copied (optionally scaled) — the method of frankenmerges."""

from __future__ import annotations

from typing import Optional

import torch

from submerge.methods.registry import Param, TensorContext, register_method


@register_method(
    name="passthrough",
    pretty_name="Passthrough",
    paper="Goddard et al., Arcee's MergeKit: A Toolkit for Merging Large Language Models, EMNLP 2024 "
          "(industry track) — layer stacking (\"frankenmerges\")",
    url="https://arxiv.org/abs/2403.13257",
    variant="as mergekit 0.1.5 (merge_methods/passthrough.py): exactly one input per tensor (one source per "
            "slice; slices of different models and layer ranges are stacked and config.json's layer count is "
            "patched); the tensor is copied unchanged, or multiplied by the input's scale when one is given "
            "(per tensor, with filters and gradients, e.g. scale: [{filter: o_proj, value: 0}, {value: 1}]). "
            "Unscaled tensors are copied byte for byte when the output dtype is the input's. Default: no scale (a copy).",
    params=[Param("scale", float, None, per_model=True, help="multiply the tensor by this value (none: copy)")],
    min_models=1,
    max_models=1,
    copy_when=lambda params: params["scale"][0] is None,
)
def passthrough(ctx: TensorContext, *, scale: list[Optional[float]]) -> torch.Tensor:
    x = ctx.tensors[0]
    return x if scale[0] is None else x.mul_(scale[0])
