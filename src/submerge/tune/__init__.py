"""``submerge tune``: the method and its parameters chosen on the user's own validation data, locally or on Ray.

:func:`tune` runs a tune config (see :mod:`submerge.tune.spec`); how candidates are scored (the eval block,
scorers, the sweep worker, local and Ray backends) is :mod:`submerge.evaluate`, shared with bench and analysis.
"""

from submerge.tune.run import TuneResult, tune
from submerge.tune.spec import load_tune, parse_tune

__all__ = ["tune", "TuneResult", "load_tune", "parse_tune"]
