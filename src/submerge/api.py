"""The Python API: ``submerge.merge(config, out_dir)`` and ``submerge.validate(config)``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Union

from submerge.config import MergeConfig, load_config, parse_config
from submerge.errors import ConfigError
from submerge.executor import Executor, MergeOptions, MergeResult
from submerge.plan import MergePlan, plan_merge

ConfigLike = Union[str, Path, dict, MergeConfig]


def _load(config: ConfigLike) -> tuple[MergeConfig, Optional[Path]]:
    if isinstance(config, (str, Path)):
        p = Path(config)
        return load_config(p), p.resolve().parent
    return parse_config(config), None


def validate(config: ConfigLike) -> MergePlan:
    """Check a config against its checkpoints (files, tensors, shapes, parameters) without merging.

    Returns the plan (its ``jobs`` list every output tensor); raises a
    :class:`~submerge.errors.SubmergeError` describing the first problem.
    """
    cfg, config_dir = _load(config)
    plan = plan_merge(cfg, config_dir)
    plan.close()
    return plan


def merge(config: ConfigLike, out_dir: Union[str, Path], options: Optional[MergeOptions] = None,
          **kwargs: Any) -> MergeResult:
    """Merge the models of ``config`` (a YAML path, a dict or a MergeConfig) into ``out_dir``.

    Keyword arguments set :class:`MergeOptions` fields (``random_seed=0``,
    ``overwrite=True``, ``out_shard_size="2GB"``, ...).  The output is written to
    a temporary sibling folder and renamed at the end: a failed merge leaves
    nothing at ``out_dir``.
    """
    opts = options or MergeOptions()
    if kwargs:
        names = {f.name for f in dataclasses.fields(MergeOptions)}
        unknown = set(kwargs) - names
        if unknown:
            raise ConfigError(f"unknown merge option(s) {sorted(unknown)}; known: {sorted(names)}")
        opts = dataclasses.replace(opts, **kwargs)
    out = Path(out_dir)
    if out.exists() and not opts.overwrite:
        raise ConfigError(f"output folder {out} already exists (pass --overwrite to replace it)")
    cfg, config_dir = _load(config)
    plan = plan_merge(cfg, config_dir)
    try:
        executor = Executor(plan, opts)
    except BaseException:
        plan.close()
        raise
    return executor.run(out)
