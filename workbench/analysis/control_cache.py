"""On-disk cache of SelfControl results, so analyses never search twice.

A search costs seconds to minutes per prompt, and every study (norm
patterns, directions, RepE cosine, ablations, notebooks) starts from the
same found controls. The cache key is everything the result depends on:
the model (:func:`workbench.store.model_fingerprint`: id, weights, dtype,
device type, chat template), the task's text (id, questions, answers), the
prompt's token ids, the :class:`SelfControlConfig` (``progress`` excluded) and
:data:`~workbench.selfcontrol.search.SEARCH_VERSION`, so a fix to the search
stops old controls from being served. A record's ``prompt`` is the text the
user gave, also when the call passed token ids. Each
entry lives in ``$WORKBENCH_HOME/controls/<hash>/``: the best control
(``Control.save``), the controls of accepted iterations, and ``result.json``
(scores, token ids, responses, first-iteration gradient norms). Entries are
written to a temporary folder and renamed, so an interrupted run leaves no
half-written entry; a damaged entry (unreadable result, truncated tensors) is
recomputed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import IncompatibleArtifactError
from ..model.loading import workbench_home
from ..selfcontrol.control import Control, layer_of
from ..selfcontrol.search import (
    SEARCH_VERSION,
    SelfControlConfig,
    SelfControlResult,
    config_dict,
    resolve_config,
    self_control,
    self_control_many,
)
from ..selfcontrol.tasks import Task, get_task
from ..store import atomic_write_json, fingerprint_hash, model_fingerprint

if TYPE_CHECKING:
    from ..model.chat_model import HookedChatModel

CACHE_FORMAT = 2
RESULT = "result.json"

#: How many searches ran (``computed``) and how many entries were read back (``loaded``)
#: in this process: lets tests and studies check that the cache was used.
stats: dict[str, int] = {"computed": 0, "loaded": 0}


@dataclass
class CachedResult:
    """What the analyses need from a SelfControl run, identical whether computed or loaded.

    ``trajectory[i]`` is the control after iteration ``i`` (unchanged when the
    iteration accepted nothing); ``grad_norms`` / ``raw_grad_norms`` are the
    first iteration's gradient norms after / before clipping.
    """

    task_id: str
    prompt: str
    prompt_ids: list[int]
    original_ids: list[int]
    original_response: str
    response_ids: list[int]
    response: str
    initial_score: float
    score: float
    original_nll: float
    nll: float
    control: Control
    trajectory: list[Control]
    accepted_steps: list[float | None]
    iteration_scores: list[float]  # best score after each iteration
    candidates: list[list[dict[str, Any]]]  # per iteration: step, score, nll, status, response of each candidate
    raw_grad_norms: Float[Tensor, "layer pos"]
    grad_norms: Float[Tensor, "layer pos"]
    hook_names: list[str]
    seconds: float  # time of the search itself (not of loading it back)
    config: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    from_cache: bool = False
    result: SelfControlResult | None = None  # the full result when computed in this call

    @property
    def gain(self) -> float:
        return self.score - self.initial_score

    @property
    def layers(self) -> list[int]:
        return [layer_of(n) for n in self.hook_names]

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task_id, "prompt": self.prompt, "original_response": self.original_response,
            "controlled_response": self.response, "initial_score": self.initial_score, "final_score": self.score,
            "gain": self.gain, "accepted_steps": self.accepted_steps, "seconds": round(self.seconds, 3),
            "from_cache": self.from_cache, "key": self.key,
        }


#: Settings the analyses use unless told otherwise: the search's defaults with fewer new tokens
#: (studies and notebooks share cached runs only when their settings match exactly).
ANALYSIS_DEFAULTS: dict[str, Any] = {"max_new_tokens": 32, "progress": False}


def analysis_config(config: SelfControlConfig | None = None, **overrides: Any) -> SelfControlConfig:
    """``config`` (default: :data:`ANALYSIS_DEFAULTS` over the search's defaults) with ``overrides``."""
    return resolve_config(config or SelfControlConfig(**ANALYSIS_DEFAULTS), **overrides)


def cache_key(model: HookedChatModel, prompt_ids: Sequence[int], task: Task, config: SelfControlConfig) -> str:
    """SHA-256 (first 24 hex digits) of the model's fingerprint, task text, prompt ids, settings and search version."""
    return fingerprint_hash({
        "format": CACHE_FORMAT,
        "search_version": SEARCH_VERSION,
        "model": model_fingerprint(model),
        "task": task.judge_dict(),
        "prompt_ids": [int(i) for i in prompt_ids],
        "config": config_dict(config),
    })[:24]


def user_text(model: HookedChatModel, prompt: str | Sequence[int]) -> str:
    """The user's message: ``prompt`` itself, or recovered from chat ids made by ``model.chat_ids(text)``.

    Why: a record's prompt appears in studies' tables and plot titles; a call
    with ids must not store the decoded chat template ("system\\nYou are a
    helpful AI assistant..."). Ids that are not one plain user turn (a system
    message, history) keep their decoded text.
    """
    if isinstance(prompt, str):
        return prompt
    ids = [int(i) for i in prompt]
    marker = "\x00USER\x00"
    rendered = model.render([{"role": "user", "content": marker}], add_generation_prompt=True)
    if rendered.count(marker) == 1:
        head, tail = rendered.split(marker)
        text = model.tokenizer.decode(ids, skip_special_tokens=False)
        if text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail):
            candidate = text[len(head): len(text) - len(tail)]
            try:
                if candidate.strip() and model.chat_ids(candidate) == ids:
                    return candidate
            except ValueError:  # InputError (too long, empty): not a plain turn
                pass
    return model.decode(ids)


def cache_root(root: str | Path | None = None) -> Path:
    return Path(root) if root is not None else workbench_home() / "controls"


def _record(result: SelfControlResult, key: str, cfg: SelfControlConfig) -> CachedResult:
    first = result.iterations[0] if result.iterations else None
    n_layers, n_pos = len(result.hook_names), len(result.prompt_ids)
    empty = torch.zeros(n_layers, n_pos)
    return CachedResult(
        task_id=result.task_id, prompt=result.prompt, prompt_ids=list(result.prompt_ids),
        original_ids=list(result.original_ids), original_response=result.original_response,
        response_ids=list(result.response_ids), response=result.response, initial_score=result.initial_score,
        score=result.score, original_nll=result.original_nll, nll=result.nll, control=result.control,
        trajectory=[it.control for it in result.iterations], accepted_steps=[it.accepted_step for it in result.iterations],
        iteration_scores=[it.best_score for it in result.iterations],
        candidates=[[{"step": c.step, "score": c.score, "nll": c.nll, "status": c.status, "response": c.response}
                     for c in it.candidates] for it in result.iterations],
        raw_grad_norms=(first.raw_grad_norms.detach().float().cpu() if first else empty),
        grad_norms=(first.grad_norms.detach().float().cpu() if first else empty),
        hook_names=list(result.hook_names), seconds=result.seconds, config=config_dict(cfg), key=key,
        from_cache=False, result=result,
    )


def _write(record: CachedResult, folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-tmp-"))
    try:
        record.control.save(tmp / "control")
        for i, (ctrl, step) in enumerate(zip(record.trajectory, record.accepted_steps, strict=True)):
            if step is not None:  # unchanged iterations are the previous control: not stored twice
                ctrl.save(tmp / "trajectory" / str(i))
        data = {k: v for k, v in record.to_dict().items() if k not in ("from_cache", "gain")}
        data.update(
            format=CACHE_FORMAT, prompt_ids=record.prompt_ids, original_ids=record.original_ids,
            response_ids=record.response_ids, original_nll=record.original_nll, nll=record.nll,
            iteration_scores=record.iteration_scores, candidates=record.candidates, raw_grad_norms=record.raw_grad_norms.tolist(),
            grad_norms=record.grad_norms.tolist(), hook_names=record.hook_names, config=record.config,
            seconds=record.seconds,
        )
        atomic_write_json(tmp / RESULT, data)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read(folder: Path, model: HookedChatModel) -> CachedResult | None:
    try:
        data = json.loads((folder / RESULT).read_text())
        if data.get("format") != CACHE_FORMAT:
            return None
        control = Control.load(folder / "control", model)
        trajectory: list[Control] = []
        previous = Control.zeros(model, len(data["prompt_ids"]), data["hook_names"])
        for i, step in enumerate(data["accepted_steps"]):
            if step is not None:
                previous = Control.load(folder / "trajectory" / str(i), model)
            trajectory.append(previous)
    except (OSError, ValueError, KeyError, TypeError, IncompatibleArtifactError):
        return None  # missing or damaged (e.g. truncated tensors: CorruptArtifactError): recompute
    return CachedResult(
        task_id=data["task"], prompt=data["prompt"], prompt_ids=data["prompt_ids"], original_ids=data["original_ids"],
        original_response=data["original_response"], response_ids=data["response_ids"],
        response=data["controlled_response"], initial_score=data["initial_score"], score=data["final_score"],
        original_nll=data["original_nll"], nll=data["nll"], control=control, trajectory=trajectory,
        accepted_steps=data["accepted_steps"], iteration_scores=data["iteration_scores"],
        candidates=data.get("candidates", []), raw_grad_norms=torch.tensor(data["raw_grad_norms"]).reshape(len(data["hook_names"]), -1),
        grad_norms=torch.tensor(data["grad_norms"]).reshape(len(data["hook_names"]), -1),
        hook_names=data["hook_names"], seconds=data["seconds"], config=data["config"], key=folder.name,
        from_cache=True,
    )


def cached_self_control(
    model: HookedChatModel,
    prompt: str | Sequence[int],
    task: Task | str,
    config: SelfControlConfig | None = None,
    *,
    root: str | Path | None = None,
    refresh: bool = False,
    **overrides: Any,
) -> CachedResult:
    """:func:`~workbench.selfcontrol.search.self_control`, read from the cache when this exact run was done before.

    ``root`` defaults to ``$WORKBENCH_HOME/controls``; ``refresh=True`` recomputes and overwrites.
    """
    cfg = resolve_config(config, **overrides)
    task = get_task(task)
    if not refresh and (record := lookup(model, prompt, task, cfg, root=root)) is not None:
        return record
    result = self_control(model, prompt, task, cfg)
    key = cache_key(model, result.prompt_ids, task, cfg)
    folder = cache_root(root) / key
    stats["computed"] += 1
    record = _record(result, key, cfg)
    record.prompt = user_text(model, prompt)
    _write(record, folder)
    return record


def cached_self_control_many(
    model: HookedChatModel,
    prompts: Sequence[str | Sequence[int]],
    task: Task | str,
    config: SelfControlConfig | None = None,
    *,
    root: str | Path | None = None,
    refresh: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
    **overrides: Any,
) -> list[CachedResult]:
    """:func:`cached_self_control` of several prompts: the cached ones are read, the others searched together.

    The missing prompts go through :func:`~workbench.selfcontrol.search.self_control_many`
    (``batch_size`` prompts at once), whose results mean the same as one search per prompt.
    """
    cfg = resolve_config(config, **overrides)
    task = get_task(task)
    records: list[CachedResult | None] = [None if refresh else lookup(model, p, task, cfg, root=root) for p in prompts]
    missing = [i for i, r in enumerate(records) if r is None]
    if missing:
        results = self_control_many(model, [prompts[i] for i in missing], task, cfg, batch_size=batch_size,
                                    progress=progress)
        for i, result in zip(missing, results, strict=True):
            key = cache_key(model, result.prompt_ids, task, cfg)
            stats["computed"] += 1
            record = records[i] = _record(result, key, cfg)
            record.prompt = user_text(model, prompts[i])
            _write(record, cache_root(root) / key)
    return [r for r in records if r is not None]


def clear_cache(root: str | Path | None = None) -> int:
    """Delete every cached entry under ``root``; returns how many were removed."""
    folder = cache_root(root)
    if not folder.is_dir():
        return 0
    entries = [p for p in folder.iterdir() if p.is_dir()]
    for p in entries:
        shutil.rmtree(p, ignore_errors=True)
    return len(entries)


def lookup(
    model: HookedChatModel,
    prompt: str | Sequence[int],
    task: Task | str,
    config: SelfControlConfig | None = None,
    *,
    root: str | Path | None = None,
    **overrides: Any,
) -> CachedResult | None:
    """The cached run if there is one (never searches)."""
    cfg = resolve_config(config, **overrides)
    task = get_task(task)
    prompt_ids = model.chat_ids(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    folder = cache_root(root) / cache_key(model, prompt_ids, task, cfg)
    record = _read(folder, model) if folder.is_dir() else None
    if record is not None:
        stats["loaded"] += 1
        record.prompt = user_text(model, prompt) if isinstance(prompt, str) else record.prompt
    return record
