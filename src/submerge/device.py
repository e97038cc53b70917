"""Where tensor math runs: a ``--device`` string checked before anything is loaded."""

from __future__ import annotations

import torch

from submerge.errors import ConfigError


def parse_device(spec: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:1``, ``mps`` ... as a torch.device that exists on this machine."""
    try:
        dev = torch.device(str(spec))
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {spec!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} was asked for, but torch sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"device {spec!r} was asked for, but torch sees no MPS device")
    elif dev.type != "cpu":
        raise ConfigError(f"device {spec!r} is not supported: use cpu, cuda, cuda:N or mps")
    return dev
