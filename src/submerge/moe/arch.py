"""The MoE architectures mergekit-moe 0.1.5 writes, with its rules for which one a config gets.

Each output keeps the base model's attention, embeddings and norms; each layer's MLP becomes a router
(``mlp.gate.weight``, one row per expert) over the experts' MLPs:

- **Mixtral** (Llama or Mistral inputs, no shared experts) and **Qwen3 MoE** (Qwen3 inputs, no shared experts):
  the experts stored fused as transformers 5 lays them out, ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (each
  expert's gate rows, then its up rows) and ``mlp.experts.down_proj`` ``[E, H, I]``.
- **DeepSeek MoE** (Llama or Mistral inputs, at most one shared expert, ungated): per-expert tensors
  ``mlp.experts.{e}.{gate,up,down}_proj.weight`` and ``mlp.shared_experts.*``.  Its config names the
  ``deepseek-ai/deepseek-moe-16b-base`` remote code (as mergekit's does): transformers loads it only with
  ``trust_remote_code`` and that code at hand.
- **Qwen MoE** (Qwen2-MoE; Qwen2, Llama or Mistral inputs, exactly one shared expert with its own gate row
  ``mlp.shared_expert_gate.weight``): per-expert tensors and ``mlp.shared_expert.*``; attention biases the input
  lacks are written as zeros (Qwen2 has them).

``noise_order`` is the order in which each architecture reads (and, with ``noise_scale``, perturbs) the MLP
tensors: mergekit draws the noise from torch's global generator in that order, so a seeded run matches it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from submerge.errors import ConfigError
from submerge.moe.config import MoEConfig

log = logging.getLogger(__name__)

MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MoEArch:
    name: str                     # mergekit's name; config ``architecture`` picks by prefix, case-insensitive
    input_types: tuple[str, ...]  # model_type of every input
    shared: str                   # "none", "optional" (0 or 1, ungated) or "one" (exactly 1, gated)
    fused: bool                   # experts as transformers 5's fused tensors
    noise_order: tuple[str, ...]  # per layer: the MLP tensors in the order mergekit reads them
    per_expert_first: bool        # fused: for each expert its tensors; per-expert: for each tensor all experts

    @property
    def gates_shared(self) -> bool:
        """Qwen MoE: its one shared expert has a router row of its own (``mlp.shared_expert_gate``)."""
        return self.shared == "one"

    @property
    def shared_module(self) -> str:
        return "shared_expert" if self.gates_shared else "shared_experts"

    @property
    def qkv_bias(self) -> bool:
        """The output architecture has q/k/v biases (Qwen2): zeros where the input has none."""
        return self.name == "Qwen MoE"

    def refuses(self, cfg: MoEConfig, model_types: list[str]) -> Optional[str]:
        """Why this architecture cannot hold ``cfg`` (None when it can), as mergekit's ``supports_config``."""
        shared = cfg.shared_experts or []
        if self.shared == "none" and shared:
            return f"{self.name} has no shared experts"
        if self.shared == "optional":
            if len(shared) > 1:
                return f"{self.name} takes at most one shared expert"
            if shared and (shared[0].positive_prompts or shared[0].negative_prompts):
                return f"{self.name} does not gate its shared expert (remove its prompts)"
        if self.shared == "one":
            if len(shared) != 1:
                return f"{self.name} needs exactly one shared expert"
            if cfg.gate_mode != "random" and not shared[0].positive_prompts:
                return f"{self.name} gates its shared expert: give it positive_prompts"
        if len(set(model_types)) != 1:
            return f"{self.name} needs every input of one architecture, got {sorted(set(model_types))}"
        if model_types[0] not in self.input_types:
            return f"{self.name} takes {' or '.join(self.input_types)} models, got {model_types[0]}"
        return None

    # ------------------------------------------------------------------ output config
    def out_config(self, base_cfg: Any, cfg: MoEConfig, dtype: Optional[str]) -> dict[str, Any]:
        """config.json of the output from the base's transformers config, built as mergekit builds it (through
        transformers' config classes where mergekit uses them)."""
        import transformers

        n, k = len(cfg.experts), cfg.experts_per_token
        n_shared = len(cfg.shared_experts or [])
        warn_pow2 = n & (n - 1) != 0
        if self.name == "DeepSeek MoE":
            out = base_cfg.to_dict()
            out.update(architectures=["DeepseekForCausalLM"], model_type="deepseek", n_routed_experts=n,
                       n_shared_experts=n_shared or None, num_experts_per_tok=k or (1 if n_shared else 2),
                       first_k_dense_replace=0, moe_layer_freq=1, scoring_func="softmax", norm_topk_prob=True,
                       moe_intermediate_size=out["intermediate_size"], auto_map={
                           "AutoConfig": "deepseek-ai/deepseek-moe-16b-base--configuration_deepseek.DeepseekConfig",
                           "AutoModel": "deepseek-ai/deepseek-moe-16b-base--modeling_deepseek.DeepseekModel",
                           "AutoModelForCausalLM":
                               "deepseek-ai/deepseek-moe-16b-base--modeling_deepseek.DeepseekForCausalLM"})
            if dtype is not None:
                out["torch_dtype"] = dtype
            return out
        if self.name == "Mixtral":
            if not isinstance(base_cfg, transformers.MistralConfig):
                mistral = transformers.MistralConfig(**base_cfg.to_dict())
                mistral.sliding_window = None
                mistral.max_position_embeddings = base_cfg.max_position_embeddings
                base_cfg = mistral
            out = transformers.MixtralConfig(**base_cfg.to_dict())
            out.architectures = ["MixtralForCausalLM"]
            out.num_local_experts = n
            out.num_experts_per_tok = k or 2
            out.sliding_window = None
        else:  # the Qwen MoEs: one sparse layer every layer, top-k weights renormalised
            qwen3 = self.name == "Qwen3 MoE"
            out = (transformers.Qwen3MoeConfig if qwen3 else transformers.Qwen2MoeConfig)(**base_cfg.to_dict())
            out.architectures = ["Qwen3MoeForCausalLM" if qwen3 else "Qwen2MoeForCausalLM"]
            fields = dict(num_experts=n, num_experts_per_tok=k or 2, decoder_sparse_step=1, norm_topk_prob=True,
                          moe_intermediate_size=out.intermediate_size)
            if not qwen3:
                fields.update(sliding_window=None, use_sliding_window=False,
                              shared_expert_intermediate_size=out.intermediate_size)
            for key, value in fields.items():
                setattr(out, key, value)
        if dtype is not None:
            import torch

            out.torch_dtype = getattr(torch, dtype)
        if warn_pow2:
            log.warning("%d experts, not a power of two: the model will not be usable in llama.cpp", n)
        return _saved_dict(out)


def _saved_dict(config: Any) -> dict[str, Any]:
    """The dict ``config.save_pretrained`` writes (its JSON, parsed back)."""
    import json

    return json.loads(config.to_json_string(use_diff=True))


ARCHITECTURES = (
    MoEArch("Mixtral", ("llama", "mistral"), "none", True, ("gate_proj", "down_proj", "up_proj"), True),
    MoEArch("DeepSeek MoE", ("llama", "mistral"), "optional", False, ("up_proj", "gate_proj", "down_proj"), False),
    MoEArch("Qwen MoE", ("llama", "mistral", "qwen2"), "one", False, ("down_proj", "gate_proj", "up_proj"), False),
    MoEArch("Qwen3 MoE", ("qwen3",), "none", True, ("gate_proj", "up_proj", "down_proj"), True),
)


def select_arch(cfg: MoEConfig, model_types: list[str]) -> MoEArch:
    """mergekit-moe's choice: the architectures whose name starts with ``architecture`` (all when unset) that
    can hold the config; Mixtral when it is one of them, else the first."""
    wanted = [a for a in ARCHITECTURES
              if not cfg.architecture or a.name.lower().startswith(cfg.architecture.lower())]
    if not wanted:
        raise ConfigError(f"architecture {cfg.architecture!r} matches none of "
                          f"{', '.join(a.name for a in ARCHITECTURES)}")
    reasons = {a.name: a.refuses(cfg, model_types) for a in wanted}
    fits = [a for a in wanted if reasons[a.name] is None]
    if not fits:
        raise ConfigError("no MoE architecture can hold this config: " + "; ".join(reasons.values()))
    return next((a for a in fits if a.name == "Mixtral"), fits[0])
