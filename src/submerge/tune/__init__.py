"""``submerge tune``: the method and its parameters chosen on the user's own validation data, locally or on Ray.

:func:`tune` runs a tune config (see :mod:`submerge.tune.spec`); scorers are in :mod:`submerge.tune.scorers`,
the evaluation engine in :mod:`submerge.tune.worker`, the backends in :mod:`submerge.tune.backends`.
"""

from submerge.tune.run import TuneResult, tune
from submerge.tune.spec import load_tune, parse_tune

__all__ = ["tune", "TuneResult", "load_tune", "parse_tune"]
