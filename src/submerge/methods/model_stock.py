"""Model Stock: interpolate the average of fine-tunes towards the base by their angle."""

from __future__ import annotations

import torch

from submerge.methods import kernels
from submerge.methods.registry import Param, TensorContext, register_method


@register_method(
    name="model_stock",
    pretty_name="Model Stock",
    paper="Jang et al., Model Stock: All we need is just a few fine-tuned models, ECCV 2024",
    url="https://arxiv.org/abs/2403.19522",
    variant="cos = mean pairwise cosine of the task vectors (per tensor, or per row with "
            "filter_wise); t = N cos / (1 + (N-1) cos); theta = t * mean(theta_i) + (1-t) * base; "
            "the base is kept where 1 + (N-1) cos ~ 0. Needs a base and >= 2 fine-tunes. "
            "Defaults: filter_wise=false.",
    params=[Param("filter_wise", bool, False, help="one angle per row instead of per tensor")],
    needs_base=True,
    min_models=2,
)
def model_stock(ctx: TensorContext, *, filter_wise: bool) -> torch.Tensor:
    base = ctx.base
    assert base is not None
    shape = base.shape
    if filter_wise:
        w0 = base if base.dim() > 1 else base.unsqueeze(0)
        w0 = w0.reshape(w0.shape[0], -1)
    else:
        w0 = base.reshape(1, -1)
    n = len(ctx.tensors)
    inputs = [x.reshape(w0.shape) for x in ctx.tensors]
    ctx.tensors.clear()
    # the mean of the inputs column block by column block (the same bits as one stack's mean), then the
    # offsets stacked as the inputs are released: one [N, ...] stack in memory, not three
    average = torch.empty_like(w0)
    flat_avg = average.reshape(-1)
    flat_in = [x.reshape(-1) for x in inputs]
    for cols in kernels.column_blocks(flat_avg.numel(), n, itemsize=w0.element_size()):
        flat_avg[cols] = torch.stack([x[cols] for x in flat_in]).mean(dim=0)
    del flat_in
    offsets = kernels.stack_released(inputs, w0)  # [N, rows, cols]
    norms = torch.linalg.vector_norm(offsets, dim=-1)  # [N, rows]
    gram = torch.einsum("irc,jrc->ijr", offsets, offsets)  # [N, N, rows]
    iu = torch.triu_indices(n, n, offset=1)
    cos = gram[iu[0], iu[1]] / (norms[iu[0]] * norms[iu[1]]).clamp(min=1e-6)
    cos = cos.clamp(-1, 1).mean(dim=0).unsqueeze(-1)  # [rows, 1]
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denom))
    return (t * average + (1 - t) * w0).reshape(shape)
