"""The routers of a MoE built from dense experts: one row per expert and layer, as mergekit-moe computes them.

- ``hidden`` / ``hidden_last``: the base model's hidden state entering each layer at the last token of each
  positive prompt (prompts left-padded), averaged over the prompts; ``hidden_avg``: averaged over every position
  of the padded batch too (mergekit divides by the padded length).  The negative prompts' vector is subtracted,
  then each row is scaled to unit length.
- ``cheap_embed``: the sum of the prompts' token embeddings, unit length, the same for every layer.
- ``random``: standard normal rows; ``uniform_random``: uniform in ±1/sqrt(hidden), torch.nn.Linear's default.
- ``calibration`` (submerge's own, no prompts): each expert's mean MLP input per layer, from ``submerge calibrate``
  statistics of that expert on its own task's inputs (ESM++'s prototypes): the router's input is exactly that
  MLP input.  The rows are centred on the experts' mean (what they share routes nowhere), then unit length.

The arithmetic follows mergekit 0.1.5 (``mergekit/moe/router.py``) step for step, so the gates agree with its
own.  Where we differ on purpose: the hidden states are computed in float32 by default (mergekit loads the base
in bfloat16); ``gate_dtype="bfloat16"`` reproduces mergekit's gates bit for bit.  cheap_embed sums the embedding
rows of the prompt tokens; mergekit multiplies a one-hot matrix of the vocabulary's width (the same sum, to
float rounding, without a batch x length x vocabulary tensor).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch

from submerge.errors import ConfigError
from submerge.moe.config import MoEConfig, MoEExpert


def prompt_tokenizer(tokenizer: Any) -> Any:
    """mergekit's padding for prompts: on the left, with the BOS token (the EOS token when there is none)."""
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id is None:
        raise ConfigError("the base model's tokenizer has neither a BOS nor an EOS token to pad prompts with")
    return tokenizer


def tokenize(prompts: Sequence[str], tokenizer: Any) -> dict[str, torch.Tensor]:
    return tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                     add_special_tokens=False)


def hidden_states(model: torch.nn.Module, tokenized: dict[str, torch.Tensor], average: bool) -> torch.Tensor:
    """``[layers, hidden]``: the state entering each layer, at the last position (or averaged over positions),
    averaged over the prompts."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in tokenized.items()}, output_hidden_states=True, return_dict=True)
    h = torch.stack(out.hidden_states[:-1])  # [layers, batch, length, hidden]
    h = h.sum(dim=2) / h.shape[2] if average else h[:, :, -1, :]
    return (h.sum(dim=1) / h.shape[1]).cpu()


def cheap_embedding(embed: torch.Tensor, tokenized: dict[str, torch.Tensor], n_layers: int) -> torch.Tensor:
    """``[layers, hidden]``: the unit-length sum of the prompts' token embeddings, repeated for every layer."""
    ids, mask = tokenized["input_ids"], tokenized["attention_mask"]
    h = (embed.float()[ids] * mask.unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    return (h / h.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(n_layers, 1)


def gate_vectors(cfg: MoEConfig, experts: Sequence[MoEExpert], n_layers: int, hidden: int,
                 model: Optional[Callable[[], torch.nn.Module]] = None, tokenizer: Any = None,
                 embed: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
    """``[layers, len(experts), hidden]``: the router rows of ``experts`` (random modes draw from torch's global
    generator, seeded by the caller).  ``model`` / ``embed``: loaders of the base model (hidden modes) or its
    input embedding (cheap_embed), called only when the mode needs them."""
    mode = cfg.gate_mode
    if mode == "calibration":
        raise ConfigError("gate_mode calibration: the rows come from calibration_gates")
    if mode == "random":
        return torch.randn((n_layers, len(experts), hidden))
    if mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        return torch.rand((n_layers, len(experts), hidden)) * 2 * scale - scale
    if mode == "cheap_embed":
        table = embed()

        def vector(tokenized):
            return cheap_embedding(table, tokenized, n_layers)
    else:
        net = model()

        def vector(tokenized):
            return hidden_states(net, tokenized, average=mode == "hidden_avg")
    rows = []
    for e in experts:
        if not e.positive_prompts:
            raise ConfigError(f"{e.source_model}: no positive_prompts for gate_mode {mode}")
        h = vector(tokenize(e.positive_prompts, tokenizer))
        if e.negative_prompts:
            h -= vector(tokenize(e.negative_prompts, tokenizer))
        h /= h.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        rows.append(h)
    return torch.stack(rows, dim=0).permute(1, 0, 2)


def calibration_gates(stats: Sequence[Any], n_layers: int, labels: Sequence[str]) -> torch.Tensor:
    """``[layers, experts, hidden]``: per layer, each expert's mean MLP input (the statistics of its
    ``model.layers.L.mlp.gate_proj``), centred on the experts' mean and scaled to unit length."""
    rows = []
    for layer in range(n_layers):
        name = f"model.layers.{layer}.mlp.gate_proj.weight"
        means = []
        for s, label in zip(stats, labels):
            st = s.lookup(name)
            if st is None:
                raise ConfigError(f"{label}: its calibration statistics have no layer for {name}; calibrate every "
                                  "linear layer (submerge calibrate without --layers)")
            means.append(st.mean.double())
        m = torch.stack(means)
        m = m - m.mean(dim=0, keepdim=True)
        rows.append((m / m.norm(dim=-1, keepdim=True).clamp(min=1e-12)).float())
    return torch.stack(rows)


def degenerate_layers(gates: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose router rows are nearly dependent (condition number above ``threshold``, mergekit's test):
    prompts too alike, so some experts will rarely be chosen."""
    return [i for i in range(gates.shape[0]) if float(torch.linalg.cond(gates[i].float())) > threshold]
