"""mergekit-moe's YAML, as it is: a base model whose attention, embeddings and norms the MoE keeps, and dense
experts whose MLPs become its experts, with a router per layer from each expert's prompts.

The fields and defaults are mergekit 0.1.5's ``MoEMergeConfig``; its own checks (``is_bad_config``) are
:func:`check_moe_config`, each a one-line :class:`~submerge.errors.ConfigError`.  A key mergekit does not know
is ignored there; here it is a warning (an error with ``--strict``), as ``submerge merge`` treats its configs.
Models are local folders, Hub ids (``org/name[@revision]``) or ``base+adapter`` (a LoRA applied to a base).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from submerge.errors import ConfigError, suggest

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random", "calibration")
DTYPES = ("float32", "float16", "bfloat16", "fp32", "fp16", "bf16")


class MoEExpert(BaseModel):
    """One dense model whose MLPs become one expert (or a shared expert) of every layer."""

    model_config = ConfigDict(extra="forbid")

    source_model: str
    positive_prompts: Optional[list[str]] = None
    negative_prompts: Optional[list[str]] = None
    noise_scale: Optional[float] = None       # Gaussian noise of this std added to the expert's MLP weights
    residual_scale: Optional[float] = None    # the expert's down projection scaled by this
    calibration: Optional[str] = None         # submerge's gate_mode calibration: a `submerge calibrate` folder


class MoEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str
    experts: list[MoEExpert]
    gate_mode: str = "hidden"
    dtype: Optional[str] = None
    experts_per_token: int = 2
    shared_experts: Optional[list[MoEExpert]] = None
    architecture: Optional[str] = None
    ignored: list[str] = []  # keys mergekit ignores (warnings), filled by parse_moe_config

    @field_validator("gate_mode")
    @classmethod
    def _gate_mode(cls, v: str) -> str:
        if v not in GATE_MODES:
            raise ValueError(f"{v!r} is not one of {', '.join(GATE_MODES)}{suggest(v, GATE_MODES)}")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v not in DTYPES:
            raise ValueError(f"{v!r} is not one of {', '.join(DTYPES)}{suggest(v, DTYPES)}")
        return v

    def models(self) -> list[str]:
        """Every model the config names, base first, in config order, once each."""
        refs = [self.base_model] + [e.source_model for e in self.experts + (self.shared_experts or [])]
        return list(dict.fromkeys(refs))

    def gated(self) -> list[MoEExpert]:
        """The experts a router row is computed for: the routed experts, then the shared experts when they carry
        prompts (or calibration statistics) or the gates are random (mergekit's rule; Qwen MoE gates its shared
        expert)."""
        shared = self.shared_experts or []
        own = any(e.calibration for e in shared) if self.gate_mode == "calibration" else \
            any(e.positive_prompts for e in shared)
        if shared and (own or self.gate_mode in ("random", "uniform_random")):
            return list(self.experts) + list(shared)
        return list(self.experts)


_EXPERT_KEYS = set(MoEExpert.model_fields)
_TOP_KEYS = set(MoEConfig.model_fields) - {"ignored"}


def parse_moe_config(raw: Any, source: str = "config", strict: bool = False) -> MoEConfig:
    """A mergekit-moe config from parsed YAML: unknown keys are warnings (``ignored``), errors with ``strict``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a mergekit-moe config is a mapping with base_model and experts")
    ignored: list[str] = []

    def drop_unknown(d: Any, known: set[str], where: str) -> Any:
        if not isinstance(d, dict):
            return d
        extra = [k for k in d if k not in known]
        for k in extra:
            msg = f"{where}: unknown key {k!r}{suggest(str(k), known)} (mergekit ignores it)"
            if strict:
                raise ConfigError(msg)
            ignored.append(msg)
        return {k: v for k, v in d.items() if k in known}

    raw = drop_unknown(raw, _TOP_KEYS, source)
    for key in ("experts", "shared_experts"):
        if isinstance(raw.get(key), list):
            raw[key] = [drop_unknown(e, _EXPERT_KEYS, f"{source}: {key}[{i}]") for i, e in enumerate(raw[key])]
    try:
        cfg = MoEConfig(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "config"
        raise ConfigError(f"{source}: {where}: {err['msg'].removeprefix('Value error, ')}") from None
    cfg.ignored = ignored
    return cfg


def load_moe_config(path: str | Path, strict: bool = False) -> MoEConfig:
    from submerge.engine.config import MAX_CONFIG_BYTES, load_yaml_text
    from submerge.io.files import read_config_text

    p = Path(path)
    return parse_moe_config(load_yaml_text(read_config_text(p, limit=MAX_CONFIG_BYTES), str(p)), str(p), strict)


def check_moe_config(cfg: MoEConfig, allow_all_same: bool = False) -> None:
    """mergekit-moe's ``is_bad_config``, in its order, each failure one line."""
    if cfg.experts_per_token < 1:
        raise ConfigError("experts_per_token must be >= 1")
    if len(cfg.experts) < cfg.experts_per_token:
        raise ConfigError(f"{len(cfg.experts)} expert(s) for experts_per_token {cfg.experts_per_token}: give at "
                          "least as many experts as experts_per_token")
    for e in cfg.experts + (cfg.shared_experts or []):
        for name in ("noise_scale", "residual_scale"):
            v = getattr(e, name)
            if v is not None and not (v == v and abs(v) != float("inf")):
                raise ConfigError(f"{e.source_model}: {name} must be a finite number, got {v}")
    if cfg.gate_mode == "random":
        return
    if cfg.gate_mode == "calibration":  # submerge's own mode: routed by statistics, no prompts
        for i, e in enumerate(cfg.gated()):
            if not e.calibration:
                raise ConfigError(f"expert {i} ({e.source_model}): gate_mode calibration routes by each expert's "
                                  "calibration statistics; give calibration: FOLDER (from `submerge calibrate`)")
        if len(cfg.gated()) < 2:
            raise ConfigError("gate_mode calibration needs two or more gated experts (rows are centred on their mean)")
        return
    for i, e in enumerate(cfg.experts):
        if not e.positive_prompts:
            raise ConfigError(f"expert {i} ({e.source_model}) has no positive_prompts (gate_mode {cfg.gate_mode} "
                              "routes by them; gate_mode random needs none)")

    def prompts(e: MoEExpert) -> tuple:
        return tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())

    # as mergekit: one expert alone fails both checks (a router over one expert routes nothing)
    if all(prompts(e) == prompts(cfg.experts[0]) for e in cfg.experts[1:]):
        raise ConfigError("every expert has the same positive and negative prompts: the router could not tell them "
                          "apart; give each expert prompts that reflect what should be routed to it")
    if not allow_all_same and all(e.source_model == cfg.experts[0].source_model for e in cfg.experts[1:]):
        raise ConfigError("every expert is the same model: the MoE would compute the same output at a higher cost "
                          "(to train it afterwards, pass --i-understand-this-is-not-useful-without-training)")
