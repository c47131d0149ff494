"""Glue: ``synthesize`` and ``evaluate`` on a :class:`~.pool.WorkerPool`, with the driver as the store's one writer.

Each worker runs the single-process path's own per-prompt work on its chunk
and returns the records; the driver opens the output folder exactly as the
single-process path does (settings checked, finished prompts skipped) and
commits each record as it arrives. What needs the model on the driver's side
(its identity for the run's settings) is asked of a worker.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import InputError
from ..prefix import synthesis as syn
from ..selfcontrol.search import SelfControlConfig, config_dict, self_control
from ..selfcontrol.tasks import Task, get_task
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
class SynthesisRecord:
    """One prompt's record as plain data: what the driver writes into the data folder."""

    key: str
    tensors: dict[str, Tensor]
    config: dict[str, Any]
    entry: dict[str, Any]


def compute_records(model: HookedChatModel, task: Task, chunk: Sequence[tuple[int, str, str]],
                    cfg: SelfControlConfig) -> list[SynthesisRecord]:
    """The single-process synthesis's per-prompt work on ``(index, key, prompt)`` items; no file access."""
    state_hooks = model.hook_names(None, syn.STATE_POINT)
    out = []
    for i, key, prompt in chunk:
        start = time.perf_counter()
        result = self_control(model, prompt, task, cfg)
        clean = syn.capture_states(model, result.prompt_ids, state_hooks)
        hidden = syn.capture_states(model, result.prompt_ids, state_hooks, control=result.control)
        shift = (hidden - clean).norm(dim=(1, 2)) / clean.norm(dim=(1, 2)).clamp_min(1e-12)
        tensors = {"prompt_ids": torch.as_tensor(result.prompt_ids, dtype=torch.long), "hidden": hidden.cpu()}
        tensors.update({f"control.{n}": d.detach().float().cpu() for n, d in result.control.deltas.items()})
        config = {"model_id": model.model_id, "d_model": model.d_model, "state_hooks": state_hooks,
                  "control_hooks": result.control.hook_names, "prompt": prompt, "task": task.id}
        entry = {
            "key": key, "index": i, "prompt": prompt, "prompt_ids": result.prompt_ids,
            "initial_score": result.initial_score, "score": result.score, "gain": result.gain,
            "original_nll": result.original_nll, "nll": result.nll,
            "iterations_accepted": result.iterations_accepted, "iterations_run": len(result.iterations),
            "shift_fraction": shift.tolist(), "max_shift_fraction": float(shift.max()),
            "control_norm": result.control.norms().norm(dim=-1).tolist(),
            "state_norm": clean.norm(dim=(1, 2)).tolist(),
            "original_response": result.original_response, "response": result.response,
            "seconds": round(time.perf_counter() - start, 3),
        }
        out.append(SynthesisRecord(key, tensors, config, entry))
    return out


@dataclass
class SynthesisJob(ModelJob):
    task: Task | None = None
    config: SelfControlConfig | None = None

    def run(self, model: HookedChatModel, items: list[tuple[str, tuple[int, str]]]) -> list[tuple[str, SynthesisRecord]]:
        records = compute_records(model, self.task, [(i, key, p) for key, (i, p) in items], self.config)
        return [(r.key, r) for r in records]


def _manifest(model: HookedChatModel, task: Task, cfg: SelfControlConfig) -> dict[str, Any]:
    return {"kind": "synthesis", "format_version": syn.FORMAT_VERSION, "model_id": model.model_id,
            "d_model": model.d_model, "n_layers": model.n_layers, "task": task.judge_dict(),
            "config": config_dict(cfg), "state_point": syn.STATE_POINT}


def synthesize_on_ray(load: dict[str, Any], task: Task | str, prompts_or_split: str | Sequence[str],
                      out_dir: str | Path, *, limit: int | None = None, config: SelfControlConfig | None = None,
                      ray: RaySettings | None = None, progress: bool = True) -> Path:
    """:func:`workbench.prefix.synthesis.synthesize` with the prompts sharded over Ray workers (same folder, same records).

    ``load``: ``load_model``'s keyword arguments (each worker loads the model once);
    ``ray``: cluster address, worker count, chunk size; its ``stats`` are filled in.
    """
    task = get_task(task)
    prompts = task.split(prompts_or_split) if isinstance(prompts_or_split, str) else list(prompts_or_split)
    if limit is not None:
        if limit < 1:
            raise InputError("limit must be at least 1")
        prompts = prompts[:limit]
    if not prompts:
        raise InputError("no prompts to synthesise")
    ray = ray or RaySettings()
    cfg = replace(config or SelfControlConfig(), progress=False)
    data_dir = Path(out_dir)
    with connect(ray.address), WorkerPool(SynthesisJob(load, task, cfg), ray.workers, device=load.get("device")) as pool:
        manifest = pool.call(lambda model: _manifest(model, task, cfg))
        (data_dir / syn.RECORDS).mkdir(parents=True, exist_ok=True)
        syn._check_manifest(data_dir, manifest)
        syn._clean_temp(data_dir)
        done = {e["key"] for e in syn.read_index(data_dir)[0]}
        todo = [(key, (i, p)) for i, p in enumerate(prompts) if (key := syn.record_key(i, p)) not in done]
        with syn._open_index(data_dir) as index:

            def commit(key: str, record: SynthesisRecord) -> None:
                syn._write_record(data_dir, key, record.tensors, record.config)
                index.write(json.dumps(record.entry) + "\n")
                index.flush()
                os.fsync(index.fileno())

            ray.stats = pool.run(todo, commit, chunk_size=ray.chunk_size, progress=progress,
                                 desc=f"synthesize [{task.id}] on {len(pool.workers)} Ray workers")
    return data_dir
