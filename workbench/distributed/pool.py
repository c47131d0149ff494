"""The engine: a pool of Ray actors that each set up once (load the model) and run chunks of items.

Why this shape:

- *Set up once*: loading a 1-8B model takes longer than many searches, so an
  actor loads it in its constructor and keeps it for every chunk it runs.
- *Dynamic balance*: search cost per prompt varies several-fold with early
  stopping, so a fixed split leaves workers idle. The driver hands out small
  chunks as workers free up (``ray.wait`` on the tasks in flight); chunks
  shrink towards the end so the last ones do not straggle.
- *Faults*: a worker that dies (killed, out of memory, node lost) loses only
  its chunk in flight; those items go back to the queue for the other
  workers and a replacement actor is started. An item that has killed
  ``max_attempts`` workers stops the run with its key named (it would kill
  every worker). An exception raised by the work itself is the caller's
  error and is re-raised as is (a bad prompt is not retried).
- *One writer*: results come back to the driver and go to ``on_result`` in
  the driver's process, each key at most once, so the caller's store has a
  single writer whatever happens to the workers.

Only this package imports Ray, and only when a ``--ray`` run starts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tqdm.auto import tqdm

from ..errors import DistributedError, WorkbenchError

log = logging.getLogger(__name__)

try:
    import ray
    from ray.exceptions import (
        ActorUnschedulableError,
        NodeDiedError,
        OutOfMemoryError,
        RayActorError,
        RayTaskError,
        WorkerCrashedError,
    )
except ImportError as err:  # pragma: no cover - the optional extra is installed in CI
    raise DistributedError(
        "--ray needs Ray, an optional extra: pip install -e '.[distributed]' (or pip install 'ray>=2.40')"
    ) from err

#: Failures that mean "this worker is gone", not "this item is bad": its items are retried elsewhere.
WORKER_LOST = (RayActorError, WorkerCrashedError, OutOfMemoryError, NodeDiedError)

Key = Hashable


class Job(Protocol):
    """What a pool runs: ``setup`` once per actor, then ``run`` on chunks. Must pickle (it is sent to every actor)."""

    def setup(self) -> Any:
        """Per-actor state, e.g. the loaded model (runs in the actor's constructor)."""

    def run(self, state: Any, items: list[tuple[Key, Any]]) -> list[tuple[Key, Any]]:
        """``(key, result)`` for every ``(key, payload)`` item; results must pickle (CPU tensors, plain data)."""


class _Worker:
    """The actor body. A setup error is kept and raised by :meth:`ready`, so the driver sees the real exception."""

    def __init__(self, job: Job, threads: int | None) -> None:
        if threads and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
        elif threads:
            os.environ["OMP_NUM_THREADS"] = str(threads)  # read when the job imports torch
        self.job = job
        self.error: BaseException | None = None
        try:
            self.state = job.setup()
        except Exception as err:  # raised again from ready(), where Ray wraps it with its cause
            self.error = err

    def ready(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def run(self, items: list[tuple[Key, Any]]) -> list[tuple[Key, Any]]:
        if self.error is not None:
            raise self.error
        return self.job.run(self.state, items)

    def call(self, fn: Callable[[Any], Any]) -> Any:
        if self.error is not None:
            raise self.error
        return fn(self.state)


@dataclass
class RunStats:
    """What a :meth:`WorkerPool.run` did: items written, items retried after a worker died, per-worker counts."""

    items: int = 0
    written: int = 0
    retried: int = 0
    workers_lost: int = 0
    chunks: int = 0
    per_worker: dict[int, int] = field(default_factory=dict)  # worker slot -> items it finished


@contextlib.contextmanager
def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> Iterator[None]:
    """Ray for the duration of the block: ``None`` starts a local cluster, ``"auto"`` or ``host:port`` joins one.

    Reuses a Ray session that is already initialised (and leaves it running);
    a session started here is shut down on exit (which also ends a local cluster).
    """
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=address, num_cpus=num_cpus if address is None else None,
                 num_gpus=num_gpus if address is None else None, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = "a local cluster" if address is None else f"the Ray cluster at {address!r}"
        raise DistributedError(f"could not start or join {where}: {err}. For a running cluster start it with "
                               "`ray start --head` on the head node and pass --ray auto there") from err
    try:
        yield
    finally:
        ray.shutdown()


def _uses_gpu(device: str | None, gpus_in_cluster: float) -> bool:
    return gpus_in_cluster > 0 and (device is None or str(device).startswith("cuda"))


class WorkerPool:
    """``workers`` Ray actors running ``job``; ``None``: one per GPU, or on a cluster without GPUs one per 4 CPUs.

    ``device``: the device the job's model loads on (``None`` = CUDA when the
    cluster has GPUs); each actor then reserves ``gpus_per_worker`` GPUs (Ray
    sets ``CUDA_VISIBLE_DEVICES``, so ``cuda`` in the actor is its own GPU, and
    a device map spreads a large model over its GPUs only), or its share of
    the CPUs (``torch`` uses that many threads). ``max_replacements``:
    how many dead actors may be replaced in all (default: one per worker).
    Use as a context manager, inside :func:`connect`.
    """

    def __init__(self, job: Job, workers: int | None = None, *, device: str | None = None, gpus_per_worker: int = 1,
                 max_replacements: int | None = None, max_attempts: int = 3) -> None:
        resources = ray.cluster_resources()
        cpus, gpus = float(resources.get("CPU", 1)), float(resources.get("GPU", 0))
        self.gpu = _uses_gpu(device, gpus)
        if gpus_per_worker < 1:
            raise DistributedError(f"gpus_per_worker must be at least 1, got {gpus_per_worker}")
        if workers is None:
            workers = int(gpus // gpus_per_worker) if self.gpu else max(1, int(cpus // 4))
        if workers < 1:
            raise DistributedError(f"a pool needs at least one worker, got {workers}")
        if self.gpu and workers * gpus_per_worker > gpus:
            raise DistributedError(f"{workers} workers need {gpus_per_worker} GPU(s) each; the cluster has {gpus:g}")
        if not self.gpu and workers > cpus:
            raise DistributedError(f"{workers} workers need a CPU each; the cluster has {cpus:g}")
        self.threads = None if self.gpu else max(1, int(cpus // workers))
        options = {"num_gpus": gpus_per_worker, "num_cpus": 1} if self.gpu else {"num_cpus": self.threads, "num_gpus": 0}
        self._actor = ray.remote(_Worker).options(max_restarts=0, max_task_retries=0, **options)
        self.job = job
        self.max_attempts = max_attempts
        self.replacements_left = workers if max_replacements is None else max_replacements
        self.workers: dict[int, Any] = {}
        self._next_slot = 0
        for _ in range(workers):
            self._start()
        self.info = self._ready(list(self.workers))

    # ---------------------------------------------------------------- actors
    def _start(self) -> int:
        slot = self._next_slot
        self._next_slot += 1
        self.workers[slot] = self._actor.remote(self.job, self.threads)
        return slot

    def _ready(self, slots: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Wait for the actors' setup; a setup error is raised as itself (e.g. the model could not load)."""
        try:
            return dict(zip(slots, ray.get([self.workers[s].ready.remote() for s in slots]), strict=True))
        except RayTaskError as err:
            raise _unwrap(err) from None
        except ActorUnschedulableError as err:
            raise DistributedError(f"Ray cannot place the workers ({err}); ask for fewer workers") from err

    def pids(self) -> dict[int, int]:
        """Process id of each live worker (slot -> pid), e.g. to watch or kill one (waits for new workers' setup)."""
        self.info.update(self._ready([slot for slot in self.workers if slot not in self.info]))
        return {slot: self.info[slot]["pid"] for slot in self.workers}

    def _lost(self, slot: int, err: BaseException) -> None:
        """Drop a dead worker and start a replacement if allowed; no workers at all is an error."""
        if slot not in self.workers:
            return
        del self.workers[slot]
        self.info.pop(slot, None)
        log.warning("worker %d died (%s); its items go to the other workers", slot, str(err).splitlines()[0])
        if self.replacements_left > 0:
            self.replacements_left -= 1
            new = self._start()
            log.warning("started worker %d to replace it", new)
        if not self.workers:
            raise DistributedError(f"every worker died and no replacement is left; last error: {err}")

    def shutdown(self) -> None:
        for handle in self.workers.values():
            ray.kill(handle)
        self.workers.clear()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---------------------------------------------------------------- work
    def call(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(state)`` on one worker (e.g. a question about the model); retried on another if that one dies."""
        while True:
            slot = next(iter(self.workers))
            try:
                return ray.get(self.workers[slot].call.remote(fn))
            except RayTaskError as err:
                raise _unwrap(err) from None
            except WORKER_LOST as err:
                self._lost(slot, err)

    def run(self, items: Sequence[tuple[Key, Any]], on_result: Callable[[Key, Any], None], *,
            chunk_size: int = 4, progress: bool = True, desc: str = "ray") -> RunStats:
        """Run every ``(key, payload)`` item once; ``on_result(key, result)`` is called in this process.

        ``chunk_size``: the most items one task carries (a worker's batch);
        towards the end chunks shrink to a fair share of what is left.
        """
        keys = [key for key, _ in items]
        if len(set(keys)) != len(keys):
            raise DistributedError("item keys must be distinct")
        stats = RunStats(items=len(items))
        pending: deque[tuple[Key, Any]] = deque(items)
        attempts: dict[Key, int] = {}
        in_flight: dict[Any, tuple[int, list[tuple[Key, Any]]]] = {}
        written: set[Key] = set()
        bar = tqdm(total=len(items), desc=desc, disable=not progress, unit="item")
        try:
            while pending or in_flight:
                busy = {slot for slot, _ in in_flight.values()}
                for slot in [s for s in self.workers if s not in busy]:
                    if not pending:
                        break
                    size = min(chunk_size, max(1, math.ceil(len(pending) / (2 * len(self.workers)))))
                    chunk = [pending.popleft() for _ in range(min(size, len(pending)))]
                    in_flight[self.workers[slot].run.remote(chunk)] = (slot, chunk)
                    stats.chunks += 1
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in ready:
                    slot, chunk = in_flight.pop(ref)
                    try:
                        results = ray.get(ref)
                    except RayTaskError as err:
                        raise _unwrap(err) from None
                    except WORKER_LOST as err:
                        stats.workers_lost += slot in self.workers
                        self._retry(chunk, attempts, pending, err)
                        stats.retried += len(chunk)
                        self._lost(slot, err)
                        continue
                    self._accept(chunk, results, written, on_result, stats, slot)
                    bar.update(len(chunk))
        finally:
            bar.close()
            for ref in in_flight:
                ray.cancel(ref, force=False)
        return stats

    def _retry(self, chunk: list[tuple[Key, Any]], attempts: dict[Key, int], pending: deque[tuple[Key, Any]],
               err: BaseException) -> None:
        for key, _ in chunk:
            attempts[key] = attempts.get(key, 0) + 1
            if attempts[key] >= self.max_attempts:
                raise DistributedError(f"item {key!r} was in flight on {attempts[key]} workers that died; "
                                       f"it may be what kills them (last error: {str(err).splitlines()[0]})")
        pending.extendleft(reversed(chunk))  # first in line again, so the order of the output stays close

    @staticmethod
    def _accept(chunk: list[tuple[Key, Any]], results: list[tuple[Key, Any]], written: set[Key],
                on_result: Callable[[Key, Any], None], stats: RunStats, slot: int) -> None:
        sent = [key for key, _ in chunk]
        got = [key for key, _ in results]
        if sorted(map(repr, got)) != sorted(map(repr, sent)):
            raise DistributedError(f"a worker returned results for {got} when given {sent}")
        for key, result in results:
            if key in written:  # cannot happen with one driver; kept so a record is never written twice
                continue
            on_result(key, result)
            written.add(key)
            stats.written += 1
            stats.per_worker[slot] = stats.per_worker.get(slot, 0) + 1


def _unwrap(err: RayTaskError) -> BaseException:
    """The exception the work raised (a :class:`WorkbenchError` stays one, so the CLI prints its line)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    return DistributedError(str(err)) if not isinstance(err, WorkbenchError) else err

