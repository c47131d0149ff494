"""Glue: ``synthesize`` and ``evaluate`` on a :class:`~.pool.WorkerPool`, with the driver as the store's one writer.

Each worker runs the single-process path's own per-prompt work on its chunk
and returns the records; the driver opens the output folder exactly as the
single-process path does (settings checked, finished prompts skipped) and
commits each record as it arrives. What needs the model on the driver's side
(its identity for the run's settings) is asked of a worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..prefix.synthesis import (
    SynthesisRecord,
    commit_record,
    compute_records,
    open_synthesis,
    synthesis_fingerprint,
    synthesis_manifest,
    synthesis_prompts,
)
from ..selfcontrol.search import SelfControlConfig
from ..selfcontrol.tasks import Task, get_task
from ..store import folder_lock
from .pool import RunStats, WorkerPool, connect

if TYPE_CHECKING:
    from ..model.chat_model import HookedChatModel


@dataclass
class ModelJob:
    """A job whose per-actor state is the model: ``load`` holds :func:`~workbench.model.loading.load_model`'s arguments."""

    load: dict[str, Any]

    def setup(self) -> HookedChatModel:
        from ..model.loading import load_model

        return load_model(**{**self.load, "progress": False})


@dataclass
class RaySettings:
    """Where and how wide a run goes: ``address`` (``None``: a local cluster, ``"auto"``: the running one),
    ``workers`` (``None``: one per GPU, or one per 4 CPUs), ``chunk_size`` (the most prompts a worker takes at once)."""

    address: str | None = None
    workers: int | None = None
    chunk_size: int = 2
    stats: RunStats = field(default_factory=RunStats)


# ---------------------------------------------------------------- synthesis
@dataclass
class SynthesisJob(ModelJob):
    """Per chunk: :func:`workbench.prefix.synthesis.compute_records`, the single-process path's own work."""

    task: Task | None = None
    config: SelfControlConfig | None = None

    def run(self, model: HookedChatModel, items: list[tuple[str, tuple[int, str]]]) -> list[tuple[str, SynthesisRecord]]:
        records = compute_records(model, self.task, [(i, key, p) for key, (i, p) in items], self.config)
        return [(r.key, r) for r in records]


def synthesize_on_ray(load: dict[str, Any], task: Task | str, prompts_or_split: str | Sequence[str],
                      out_dir: str | Path, *, limit: int | None = None, config: SelfControlConfig | None = None,
                      restart: bool = False, ray: RaySettings | None = None, progress: bool = True) -> Path:
    """:func:`workbench.prefix.synthesis.synthesize` with the prompts sharded over Ray workers (same folder, same records).

    ``load``: ``load_model``'s keyword arguments (each worker loads the model once);
    ``ray``: cluster address, worker count, chunk size; its ``stats`` are filled in.
    The folder is locked first, so a second writer is refused before any worker starts.
    """
    task = get_task(task)
    split, prompts = synthesis_prompts(task, prompts_or_split, limit)
    ray = ray or RaySettings()
    cfg = replace(config or SelfControlConfig(), progress=False)
    data_dir = Path(out_dir)
    with folder_lock(data_dir), connect(ray.address), \
            WorkerPool(SynthesisJob(load, task, cfg), ray.workers, device=load.get("device")) as pool:
        fingerprint, manifest = pool.call(lambda model: (synthesis_fingerprint(model, task, split, prompts, cfg),
                                                         synthesis_manifest(model, task, cfg, split)))
        todo = open_synthesis(data_dir, fingerprint, manifest, prompts, restart=restart)
        ray.stats = pool.run([(key, (i, p)) for i, key, p in todo], lambda key, record: commit_record(data_dir, record),
                             chunk_size=ray.chunk_size, progress=progress,
                             desc=f"synthesize [{task.id}] on {len(pool.workers)} Ray workers")
    return data_dir
