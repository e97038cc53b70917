"""Weight averaging (model soup / linear merge)."""

from __future__ import annotations

import torch

from submerge.errors import ConfigError
from submerge.methods.registry import Param, TensorContext, register_method


@register_method(
    name="linear",
    pretty_name="Linear (weight averaging / model soup)",
    paper="Wortsman et al., Model soups: averaging weights of multiple fine-tuned models improves "
          "accuracy without increasing inference time, ICML 2022",
    url="https://arxiv.org/abs/2203.05482",
    variant="theta = sum_i weight_i * theta_i, divided by sum_i weight_i when normalize (the uniform "
            "soup with equal weights). Every listed model is an input, the base too when listed; "
            "base_model alone only supplies config and tokenizer. Defaults as mergekit: "
            "normalize=true; weight is required.",
    params=[
        Param("weight", float, per_model=True, help="mixing weight of this model"),
        Param("normalize", bool, True, help="divide by the sum of the weights"),
    ],
)
def linear(ctx: TensorContext, *, weight: list[float], normalize: bool) -> torch.Tensor:
    tensors = ctx.tensors
    out = tensors[0].mul_(weight[0])
    for i in range(1, len(tensors)):
        out.add_(tensors[i], alpha=weight[i])
        tensors[i] = None
    if normalize:
        total = sum(weight)
        if total == 0:
            raise ConfigError(f"linear at {ctx.name}: weights sum to 0, cannot normalize")
        out.div_(total)
    return out
