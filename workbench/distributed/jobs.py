"""Glue: ``synthesize`` and ``evaluate`` on a :class:`~.pool.WorkerPool`, with the driver as the store's one writer.

Each worker runs the single-process path's own per-prompt work on its chunk
and returns the records; the driver opens the output folder exactly as the
single-process path does (settings checked, finished prompts skipped) and
commits each record as it arrives. What needs the model on the driver's side
(its identity for the run's settings) is asked of a worker.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..evaluation.methods import Decoding, Method
from ..evaluation.report import PREPARED, RESULTS, write_summary
from ..evaluation.runner import (
    Evaluation,
    evaluation_config,
    evaluation_inputs,
    open_evaluation,
    prepare_methods,
    read_prepared,
    respond_and_judge,
    result_key,
    run_fingerprint,
)
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
from ..store import append_jsonl, atomic_write_json, folder_lock
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
    ``workers`` (``None``: one per GPU, or one per 4 CPUs), ``chunk_size`` (the most prompts a worker takes at once),
    ``gpus_per_worker`` (more than one: a model larger than one GPU, loaded with a device map)."""

    address: str | None = None
    workers: int | None = None
    chunk_size: int = 2
    gpus_per_worker: int = 1
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
            WorkerPool(SynthesisJob(load, task, cfg), ray.workers, device=load.get("device"),
                       gpus_per_worker=ray.gpus_per_worker) as pool:
        fingerprint, manifest = pool.call(lambda model: (synthesis_fingerprint(model, task, split, prompts, cfg),
                                                         synthesis_manifest(model, task, cfg, split)))
        todo = open_synthesis(data_dir, fingerprint, manifest, prompts, restart=restart)
        ray.stats = pool.run([(key, (i, p)) for i, key, p in todo], lambda key, record: commit_record(data_dir, record),
                             chunk_size=ray.chunk_size, progress=progress,
                             desc=f"synthesize [{task.id}] on {len(pool.workers)} Ray workers")
    return data_dir


# ---------------------------------------------------------------- evaluation
@dataclass
class EvaluationJob(ModelJob):
    """Per chunk: :func:`workbench.evaluation.runner.respond_and_judge`, the single-process path's own work.

    The actor's state: the model, its own copies of the methods (functions
    sent with :meth:`WorkerPool.call` must use these, not the job they were
    pickled with), and which (task, method) it has set up.
    """

    tasks: list[Task] = field(default_factory=list)
    methods: list[Method] = field(default_factory=list)
    decoding: Decoding | None = None
    by_task: dict[str, list[str]] = field(default_factory=dict)

    def setup(self) -> dict[str, Any]:
        return {"model": super().setup(), "methods": self.methods, "ready": set(), "suffixes": {}}

    def prepare(self, state: dict[str, Any], task: Task, names: Sequence[str],
                prepared: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Set up ``names`` for ``task`` on this actor (from ``prepared``'s state where there is one)."""
        todo = [m for m in state["methods"] if m.name in names and (task.id, m.name) not in state["ready"]]
        states = prepare_methods(state["model"], task, todo, self.decoding, self.by_task[task.id], prepared)
        state["ready"].update((task.id, m.name) for m in todo)
        return states

    def run(self, state: dict[str, Any], items: list[tuple[tuple[str, int], tuple[str, list[str], dict[str, Any]]]]
            ) -> list[tuple[tuple[str, int], list[dict[str, Any]]]]:
        model = state["model"]
        tasks = {t.id: t for t in self.tasks}
        out: dict[tuple[str, int], list[dict[str, Any]]] = {key: [] for key, _ in items}
        for task_id in dict.fromkeys(key[0] for key, _ in items):
            task = tasks[task_id]
            mine = [(key, payload) for key, payload in items if key[0] == task_id]
            names = sorted({n for _, (_, pending, _) in mine for n in pending})
            self.prepare(state, task, names, {name: {task_id: st} for name, st in mine[0][1][2].items()})
            if task_id not in state["suffixes"]:
                state["suffixes"][task_id] = task.compile(model)
            suffixes = state["suffixes"][task_id]
            done = {(task_id, m.name, prompt) for _, (prompt, pending, _) in mine for m in state["methods"]
                    if m.name not in pending}
            chunk = [(key[1], prompt) for key, (prompt, _, _) in mine]
            for record in respond_and_judge(model, task, state["methods"], chunk, self.decoding, suffixes, done):
                out[(task_id, record["prompt_index"])].append(record)
        return list(out.items())


def evaluate_on_ray(load: dict[str, Any], tasks: Sequence[Task | str] | str, methods: Sequence[str | Method] | str,
                    prompts: str | Path | Sequence[str] | Mapping[str, Sequence[str]], out_dir: str | Path, *,
                    prefix: str | Path | None = None, max_new_tokens: int = 40, seed: int = 0,
                    do_sample: bool = False, temperature: float = 1.0, top_p: float | None = None,
                    limit: int | None = None, selfcontrol: Any = None, repe: dict[str, Any] | None = None,
                    prompt_style: str = "user", batch_prompts: int | None = None, restart: bool = False,
                    ray: RaySettings | None = None,
                    progress: bool = True) -> Evaluation:
    """:func:`workbench.evaluation.runner.evaluate` with the prompts sharded over Ray workers (same folder, same records).

    The driver sets each method up once per task on one worker (e.g. repe's
    coefficient choice) and saves that state; every worker then sets up from
    it, answers and judges its chunks, and the driver appends each record.
    A prefix controller folder must be readable at the same path on every node.
    """
    task_objs, method_objs, decoding, by_task = evaluation_inputs(
        tasks, methods, prompts, prefix=prefix, max_new_tokens=max_new_tokens, seed=seed, do_sample=do_sample,
        temperature=temperature, top_p=top_p, limit=limit, selfcontrol=selfcontrol, repe=repe,
        prompt_style=prompt_style, batch_prompts=batch_prompts)
    ray = ray or RaySettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job = EvaluationJob(load, tasks=task_objs, methods=method_objs, decoding=decoding, by_task=by_task)
    with folder_lock(out), connect(ray.address), \
            WorkerPool(job, ray.workers, device=load.get("device"), gpus_per_worker=ray.gpus_per_worker) as pool:
        fingerprint, config = pool.call(lambda state: (
            run_fingerprint(state["model"], task_objs, state["methods"], by_task, decoding),
            evaluation_config(state["model"], task_objs, state["methods"], by_task, decoding, out, prompts=prompts,
                              limit=limit, prompt_style=prompt_style, prefix=prefix)))
        records = open_evaluation(out, fingerprint, config, restart=restart)
        done = {result_key(r) for r in records}
        prepared = read_prepared(out)
        items = []
        for task in task_objs:
            pending = {p: [m.name for m in method_objs if (task.id, m.name, p) not in done] for p in by_task[task.id]}
            busy = sorted({n for names in pending.values() for n in names})
            if not busy:
                continue
            states = pool.call(lambda state, task=task, busy=busy: job.prepare(state, task, busy, prepared))
            if states:
                for name, state in states.items():
                    prepared.setdefault(name, {})[task.id] = state
                atomic_write_json(out / PREPARED, prepared)
            task_state = {name: per_task[task.id] for name, per_task in prepared.items() if task.id in per_task}
            items += [((task.id, i), (p, pending[p], task_state)) for i, p in enumerate(by_task[task.id]) if pending[p]]

        def commit(key: tuple[str, int], new: list[dict[str, Any]]) -> None:
            for record in new:
                append_jsonl(out / RESULTS, record)
                records.append(record)

        ray.stats = pool.run(items, commit, chunk_size=ray.chunk_size, progress=progress,
                             desc=f"evaluate on {len(pool.workers)} Ray workers")
    summary = write_summary(out)
    wanted = {(t.id, m.name, p) for t in task_objs for m in method_objs for p in by_task[t.id]}
    return Evaluation(out, [r for r in records if result_key(r) in wanted], summary)
