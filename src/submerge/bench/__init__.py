"""The offline benchmark: real pre-trained backbone, real shipped data, every method scored.

Public API: :class:`Task`, :func:`register_task`, :func:`get_task`, :class:`BenchConfig`,
:func:`run_bench`.  Data and backbone come from ``scripts/setup-bench.sh``.
"""

from submerge.bench.tasks import SUITES, Task, get_task, list_tasks, register_task
from submerge.bench.run import run_bench
from submerge.bench.session import BenchConfig

__all__ = ["Task", "register_task", "get_task", "list_tasks", "SUITES", "BenchConfig", "run_bench"]
