"""``submerge moe``: a mixture of experts from dense fine-tunes (mergekit-moe's configs, architectures and gates)."""

from submerge.moe.build import MoEOptions, MoEResult, build_moe
from submerge.moe.config import MoEConfig, MoEExpert, load_moe_config, parse_moe_config

__all__ = ["MoEConfig", "MoEExpert", "MoEOptions", "MoEResult", "build_moe", "load_moe_config", "parse_moe_config"]
