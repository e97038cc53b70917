"""Where the sweep runs: in this process (``local``) or on a Ray cluster (``ray``).

Both run the same :class:`~submerge.evaluate.worker.SweepWorker` over the same candidates and return the same
results.  On Ray:

* each expert's calibration / Fisher statistics are Ray tasks (one per expert; a GPU each when the cluster
  has GPUs), written into the calibration cache — the cache, like the model folders, must be on storage every
  node sees;
* the base and the experts' tensors are put into the object store once; each actor (a ``SweepWorker``) gets
  them at start, so no candidate re-reads a checkpoint;
* candidates are submitted to the actors and gathered as they finish (``ray.wait``); an actor that dies is
  restarted by Ray and its candidate retried (``max_restarts`` / ``max_task_retries``) — Ray schedules, we do
  not;
* a candidate whose scorer raises comes back as an error naming it; the others are kept.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

from submerge.cluster import check_ray_address  # noqa: F401 (its public home before the merge backend shared it)
from submerge.errors import ConfigError

log = logging.getLogger("submerge.tune")


class LocalBackend:
    """Everything in this process, one candidate after another."""

    name = "local"

    def __init__(self, threads: Optional[int] = None):
        self.threads = threads
        self.worker = None

    def compute_stats(self, jobs: Sequence[Callable[[], Any]]) -> list:
        return [fn() for fn in jobs]

    def start(self, worker_args: dict) -> None:
        from submerge.evaluate.worker import SweepWorker

        self.worker = SweepWorker(**worker_args, threads=self.threads)

    def expert_scores(self) -> dict[str, float]:
        return self.worker.score_experts()

    def run(self, candidates: Sequence, on_result: Callable) -> None:
        for cand in candidates:
            on_result(self.worker.run(cand))

    def close(self) -> None:
        self.worker = None


class RayBackend:
    """Candidates on Ray actors; statistics as Ray tasks."""

    name = "ray"

    def __init__(self, address: Optional[str] = None, actors: Optional[int] = None, cpus_per_actor: int = 1,
                 max_restarts: int = 2):
        import ray

        self.ray = ray
        self._own = False
        self.actors: list = []
        self._refs: Optional[tuple] = None
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address not in (None, "", "local"):
                kw["address"] = address
            ray.init(**kw)
            self._own = True
        res = ray.cluster_resources()
        self.gpus = int(res.get("GPU", 0))
        cpus = int(res.get("CPU", 1))
        self.cpus_per_actor = cpus_per_actor
        room = max(1, cpus // cpus_per_actor)
        if actors is not None and actors > room:
            self.close()
            raise ConfigError(f"--actors {actors}: the Ray cluster has {cpus} CPU(s), room for {room} actor(s) of "
                              f"{cpus_per_actor} CPU each; the others would wait forever (ask for at most {room}, "
                              f"or add nodes)")
        self.n_actors = actors or room
        self.max_restarts = max_restarts
        log.info("ray: %d CPU(s), %d GPU(s), %d actor(s)", cpus, self.gpus, self.n_actors)

    def compute_stats(self, jobs: Sequence[Callable[[], Any]]) -> list:
        remote = self.ray.remote(_call).options(num_gpus=1 if self.gpus else 0, max_retries=2)
        return self.ray.get([remote.remote(fn) for fn in jobs])

    def start(self, worker_args: dict) -> None:
        args = dict(worker_args)
        # the tensors go into the object store once (held for the whole sweep); every actor receives them
        args["base"] = self.put(args["base"])
        args["experts"] = self.put(args["experts"])
        self.start_actors(_RayWorker, args, self.cpus_per_actor)

    def put(self, value: Any):
        """``value`` in the object store, held until :meth:`close` (a restarted actor fetches it again)."""
        ref = self.ray.put(value)
        self._refs = (*(self._refs or ()), ref)
        return ref

    def start_actors(self, actor_class: type, *args: Any) -> None:
        """``n_actors`` actors of ``actor_class`` (object refs among ``args`` arrive resolved), restarted by
        Ray when they die, their calls retried."""
        actor_cls = self.ray.remote(actor_class).options(num_cpus=self.cpus_per_actor, num_gpus=0,
                                                          max_restarts=self.max_restarts,
                                                          max_task_retries=self.max_restarts)
        self.actors = [actor_cls.remote(*args) for _ in range(self.n_actors)]

    def expert_scores(self) -> dict[str, float]:
        scores = self.ray.get(self.actors[0].score_experts.remote())
        self.ray.get([a.set_expert_scores.remote(scores) for a in self.actors])
        return scores

    def run(self, candidates: Sequence, on_result: Callable) -> None:
        from submerge.evaluate.worker import CandidateResult

        def failed(cand, e: Exception):  # the actor died more often than Ray may restart it
            return CandidateResult(cand.index, cand.label,
                                   error=f"candidate {cand.label}: its Ray worker failed "
                                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})")

        self.map_unordered(candidates, lambda cand, result: on_result(result),
                           lambda cand, e: on_result(failed(cand, e)))

    def map_unordered(self, items: Sequence, on_result: Callable[[Any, Any], None],
                      on_error: Callable[[Any, Exception], None]) -> None:
        """``actor.run(item)`` for every item, one per free actor, gathered as they finish (``ray.wait``):
        ``on_result(item, result)``, or ``on_error(item, exception)`` when its call failed for good."""
        ray = self.ray
        queue = list(items)
        busy: dict = {}  # object ref -> (actor, item)
        free = list(self.actors)
        while queue or busy:
            while queue and free:
                actor, item = free.pop(0), queue.pop(0)
                busy[actor.run.remote(item)] = (actor, item)
            done, _ = ray.wait(list(busy), num_returns=1)
            ref = done[0]
            actor, item = busy.pop(ref)
            free.append(actor)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as e:
                on_error(item, e)
            else:
                on_result(item, result)

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # already gone
                pass
        self.actors = []
        self._refs = None
        if self._own:
            self.ray.shutdown()


def _call(fn: Callable[[], Any]) -> Any:
    return fn()


class _RayWorker:
    """A SweepWorker inside a Ray actor (the object-store refs in ``args`` arrive resolved)."""

    def __init__(self, args: dict, threads: int):
        import ray

        from submerge.evaluate.worker import SweepWorker

        args = dict(args)
        for k in ("base", "experts"):
            if isinstance(args[k], ray.ObjectRef):
                args[k] = ray.get(args[k])
        self.w = SweepWorker(**args, threads=threads)

    def score_experts(self):
        return self.w.score_experts()

    def set_expert_scores(self, scores):
        self.w.set_expert_scores(scores)

    def run(self, cand):
        return self.w.run(cand)


def make_backend(name: str, address: Optional[str] = None, threads: Optional[int] = None,
                 actors: Optional[int] = None):
    """The backend ``name`` (checked by ``tune`` before any work)."""
    return RayBackend(address, actors=actors) if name == "ray" else LocalBackend(threads)
