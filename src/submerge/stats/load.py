"""Per-model statistics from memory or a saved folder, whichever kind (Gram or Fisher) the folder holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

from submerge.errors import ConfigError
from submerge.stats.fisher import FisherReader, FisherStats, is_fisher_folder
from submerge.stats.gram import CalibrationStats, LayerStats, StatsReader


class LazyStats(Sequence):
    """Per model, the stats of one tensor's layer, read from disk only when a method indexes it
    (ESM's per-tensor pass never does: its statistics were used in the whole-model pass)."""

    def __init__(self, sources: list[tuple[Optional[CalibrationStats], str]]):
        self._sources = sources
        self._cache: dict[int, Optional[LayerStats]] = {}

    def __len__(self) -> int:
        return len(self._sources)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i not in self._cache:
            stats, name = self._sources[i]
            self._cache[i] = stats.lookup(name) if stats is not None else None
        return self._cache[i]


StatsLike = Union[CalibrationStats, str, Path]


def load_stats(source: StatsLike) -> CalibrationStats:
    """Per-model statistics from an in-memory object or a saved folder: calibration statistics
    (``submerge calibrate``) or a diagonal Fisher (``submerge fisher``, :mod:`submerge.stats.fisher`)."""
    if isinstance(source, (CalibrationStats, FisherStats)):
        return source
    if is_fisher_folder(source):
        return FisherReader(source)
    return StatsReader(source)


def check_stats_kind(stats: Any, want: str, method: str, where: str) -> None:
    """A method reading Gram statistics given a Fisher folder (or the other way round) fails here."""
    kind = getattr(stats, "kind", "calibration")
    if kind != want:
        make = "`submerge fisher`" if want == "fisher" else "`submerge calibrate`"
        raise ConfigError(f"{where}: {method} needs {want} statistics (from {make}), got {kind} statistics")
