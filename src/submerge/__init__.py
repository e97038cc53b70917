"""submerge: merge fine-tuned models of one pre-trained base into one multi-task model.

The public names below are imported on first use (PEP 562), so ``import submerge`` — and every
``submerge --help`` — does not pay for importing torch until a command needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from submerge._lazy import lazy_exports
from submerge.version import __version__  # noqa: F401

_EXPORTS = {
    "merge": "submerge.api",
    "merge_state_dicts": "submerge.api",
    "validate": "submerge.api",
    "MergeConfig": "submerge.engine.config",
    "load_config": "submerge.engine.config",
    "parse_config": "submerge.engine.config",
    "CheckpointError": "submerge.errors",
    "ConfigError": "submerge.errors",
    "NonFiniteError": "submerge.errors",
    "SubmergeError": "submerge.errors",
    "MergeOptions": "submerge.engine.plan",
    "MergeResult": "submerge.engine.executor",
    "get_method": "submerge.methods",
    "list_methods": "submerge.methods",
    "register_method": "submerge.methods",
}
__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from submerge.api import merge, merge_state_dicts, validate  # noqa: F401
    from submerge.engine.config import MergeConfig, load_config, parse_config  # noqa: F401
    from submerge.errors import CheckpointError, ConfigError, NonFiniteError, SubmergeError  # noqa: F401
    from submerge.engine.executor import MergeResult  # noqa: F401
    from submerge.engine.plan import MergeOptions  # noqa: F401
    from submerge.methods import get_method, list_methods, register_method  # noqa: F401
