"""submerge: merge fine-tuned models of one pre-trained base into one multi-task model."""

__version__ = "0.1.0"

from submerge.api import merge, merge_state_dicts, validate  # noqa: E402
from submerge.config import MergeConfig, load_config, parse_config  # noqa: E402
from submerge.errors import CheckpointError, ConfigError, NonFiniteError, SubmergeError  # noqa: E402
from submerge.executor import MergeOptions, MergeResult  # noqa: E402
from submerge.methods import get_method, list_methods, register_method  # noqa: E402

__all__ = [
    "merge",
    "merge_state_dicts",
    "validate",
    "MergeConfig",
    "MergeOptions",
    "MergeResult",
    "load_config",
    "parse_config",
    "get_method",
    "list_methods",
    "register_method",
    "SubmergeError",
    "ConfigError",
    "CheckpointError",
    "NonFiniteError",
]
