"""Training data for a prefix controller: SelfControl's controlled hidden states, one record per prompt.

Why on disk, one record at a time: a search costs seconds per prompt, so a
long run must survive being killed. Each record is written to a hidden temp
folder and renamed into place (a reader never sees half a record); then one
line is appended to ``index.jsonl`` (:func:`workbench.store.append_jsonl`).
The index line is the commit: a record folder without one is redone, a torn
last line is dropped and cut off on resume. The run's fingerprint
(``run.json``, :func:`workbench.store.check_fingerprint`) pins the model (id,
weights, dtype, device type), the task's judge text, the search settings and
version, the split and every prompt by position; a rerun with different ones
is refused (mixing them would make the data meaningless), one with more
prompts of the same split extends the data. ``manifest.json`` describes the
data for training; a second process writing the same folder is refused.

Filters (score improved, hidden-state shift small) are *not* applied here:
the data keeps every outcome and :func:`workbench.prefix.train_prefix` filters
with counted reasons, so one synthesis serves several filter settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import IncompatibleArtifactError, InputError
from ..selfcontrol.control import Control
from ..selfcontrol.search import (
    SEARCH_VERSION,
    SelfControlConfig,
    SelfControlResult,
    config_dict,
    default_batch_prompts,
    self_control_many,
)
from ..selfcontrol.tasks import Task, get_task
from ..store import (
    append_jsonl,
    atomic_write_json,
    check_fingerprint,
    folder_lock,
    load_artifact,
    model_fingerprint,
    read_jsonl,
    record_key,
    save_artifact,
)

if TYPE_CHECKING:
    from ..model.chat_model import HookedChatModel

RECORD_KIND = "synthesis_record"
MANIFEST = "manifest.json"
INDEX = "index.jsonl"
RECORDS = "records"
FORMAT_VERSION = 1
STATE_POINT = "hook_resid_post"


# ---- hidden states ---------------------------------------------------------------
@torch.no_grad()
def capture_states(
    model: HookedChatModel,
    prompt_ids: Sequence[int],
    hook_names: Sequence[str] | None = None,
    control: Control | None = None,
) -> Float[Tensor, "layer pos d_model"]:
    """Residual stream at every prompt position and hook (default: all ``hook_resid_post``), float32.

    With ``control`` its additions are applied first (its hooks are registered
    before the capturing ones, so the capture sees the controlled stream).
    """
    names = list(hook_names or model.hook_names(None, STATE_POINT))
    with control.applied(model) if control is not None else contextlib.nullcontext():
        cache = model.capture(model.as_tensor(list(prompt_ids)), names)
    # under a device map each layer's states sit on that layer's device: gather them on the input device
    return torch.stack([cache[n][0].float().to(model.device) for n in names])


# ---- the dataset on disk ------------------------------------------------------------
def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise InputError(f"{data_dir} holds no synthesised data ({MANIFEST} missing); run `python -m workbench synthesize` first") from err
    except ValueError as err:
        raise IncompatibleArtifactError(f"{path} is not valid JSON: {err}") from err
    if manifest.get("kind") != "synthesis" or manifest.get("format_version") != FORMAT_VERSION:
        raise IncompatibleArtifactError(f"{path} is not a synthesis manifest of format version {FORMAT_VERSION}")
    return manifest


def read_index(data_dir: str | Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Committed index entries (a torn last line is dropped; cut off only with ``repair``, by the folder's writer)."""
    return read_jsonl(Path(data_dir) / INDEX, repair=repair)


def search_prompts(model: HookedChatModel, prompts: Sequence[str], task: Task,
                   config: SelfControlConfig, batch_size: int | None = None) -> list[SelfControlResult]:
    """SelfControl on each prompt: the one place synthesis and evaluation run their searches.

    Batched across prompts (:func:`~workbench.selfcontrol.search.self_control_many`,
    ``batch_size`` at once, default :func:`~workbench.selfcontrol.search.default_batch_prompts`);
    a sharded run (Ray) calls this on each worker's chunk.
    """
    return self_control_many(model, list(prompts), task, config, batch_size=batch_size, progress=False)


# ---- records -----------------------------------------------------------------------
@dataclass
class Record:
    """One synthesised prompt: the controlled hidden states and the control that produced them."""

    key: str
    prompt: str
    prompt_ids: list[int]
    hidden: Float[Tensor, "layer pos d_model"]  # controlled, at STATE_POINT of every layer
    state_hooks: list[str]
    control: Control
    info: dict[str, Any] = field(default_factory=dict)  # scores, nll, norms, responses (the index line)

    @property
    def gain(self) -> float:
        return float(self.info["score"] - self.info["initial_score"])

    @property
    def max_shift_fraction(self) -> float:
        return float(self.info["max_shift_fraction"])


def load_record(data_dir: str | Path, entry: dict[str, Any], model: HookedChatModel | None = None) -> Record:
    """With ``model``, tensors go to its device once here (``hidden`` stays float32: it is the training target)."""
    tensors, config = load_artifact(
        Path(data_dir) / RECORDS / entry["key"], RECORD_KIND, model=model, required=("control_hooks", "state_hooks"),
        tensor_names=lambda c: ["hidden", "prompt_ids", *(f"control.{n}" for n in c["control_hooks"])],
        remedy=f"Synthesise again into a new --out folder (or delete {data_dir} and rerun synthesize)")
    deltas = {n: tensors[f"control.{n}"] for n in config["control_hooks"]}
    hidden = tensors["hidden"]
    if model is not None:
        deltas = {n: d.to(device=model.device, dtype=model.dtype) for n, d in deltas.items()}
        hidden = hidden.to(model.device)
    return Record(key=entry["key"], prompt=entry["prompt"], prompt_ids=tensors["prompt_ids"].tolist(),
                  hidden=hidden, state_hooks=list(config["state_hooks"]),
                  control=Control(deltas, config["model_id"]), info=dict(entry))


def load_records(data_dir: str | Path, model: HookedChatModel | None = None) -> tuple[dict[str, Any], list[Record]]:
    """The manifest and every committed record (checked against ``model`` if given)."""
    manifest = read_manifest(data_dir)
    if model is not None and manifest["model_id"] != model.model_id:
        raise IncompatibleArtifactError(
            f"{data_dir} was synthesised on {manifest['model_id']!r}, not {model.model_id!r}; synthesise on this model"
        )
    return manifest, [load_record(data_dir, e, model) for e in read_index(data_dir)]


def _write_record(data_dir: Path, key: str, tensors: dict[str, Tensor], config: dict[str, Any]) -> None:
    records = data_dir / RECORDS
    tmp = records / f".tmp-{key}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_artifact(tmp, RECORD_KIND, tensors, config)
    final = records / key
    if final.exists():  # written by a run killed before its index line: redo it
        shutil.rmtree(final)
    os.replace(tmp, final)


def _clean_temp(data_dir: Path) -> None:
    records = data_dir / RECORDS
    for tmp in records.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def synthesis_fingerprint(model: HookedChatModel, task: Task, split: str | None, prompts: Sequence[str],
                          config: SelfControlConfig) -> dict[str, Any]:
    """What a synthesis folder's data depends on (see the module docstring); ``prompts`` may only grow."""
    return {"kind": "synthesis", "format_version": FORMAT_VERSION, "model": model_fingerprint(model),
            "task": task.judge_dict(), "config": config_dict(config), "search_version": SEARCH_VERSION,
            "state_point": STATE_POINT, "split": split, "prompts": {str(i): p for i, p in enumerate(prompts)}}


def synthesize(
    model: HookedChatModel,
    task: Task | str,
    prompts_or_split: str | Sequence[str],
    out_dir: str | Path,
    *,
    limit: int | None = None,
    config: SelfControlConfig | None = None,
    restart: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
) -> Path:
    """Run SelfControl on each prompt and append one record per prompt to ``out_dir`` (resumable).

    ``prompts_or_split``: a split name of ``task`` (``"train"``) or a list of
    prompt texts; ``limit`` keeps the first N. A rerun skips finished prompts;
    one with other settings, another split or other prompts is refused
    (:class:`~workbench.errors.ResumeMismatchError`) unless ``restart``, which
    discards the folder's data first. ``batch_size``: prompts searched together, per call of
    :func:`search_prompts` (default :func:`~workbench.selfcontrol.search.default_batch_prompts`;
    records are committed after each call; results do not depend on it).
    Returns ``out_dir``.
    """
    task = get_task(task)
    split, prompts = synthesis_prompts(task, prompts_or_split, limit)
    if batch_size is None:
        batch_size = default_batch_prompts(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    cfg = replace(config or SelfControlConfig(), progress=False)
    data_dir = Path(out_dir)
    with folder_lock(data_dir):
        todo = open_synthesis(data_dir, synthesis_fingerprint(model, task, split, prompts, cfg),
                              synthesis_manifest(model, task, cfg, split), prompts, restart=restart)
        bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc=f"synthesize [{task.id}]",
                   disable=not progress, unit="prompt")
        for first in range(0, len(todo), batch_size):
            for record in compute_records(model, task, todo[first:first + batch_size], cfg):
                commit_record(data_dir, record)
                bar.update(1)
                bar.set_postfix(gain=f"{record.entry['gain']:+.4f}")
        bar.close()
    return data_dir


# ---- the three pieces of a run: open the folder, compute records, commit them -------------
# Split so that a sharded run (workbench.distributed) computes on workers and commits on
# the driver with the very same functions.
def synthesis_prompts(task: Task, prompts_or_split: str | Sequence[str], limit: int | None) -> tuple[str | None, list[str]]:
    """The split's name (``None`` for a list) and the prompts to run, the first ``limit``."""
    split = prompts_or_split if isinstance(prompts_or_split, str) else None
    prompts = task.split(prompts_or_split) if isinstance(prompts_or_split, str) else list(prompts_or_split)
    if limit is not None:
        if limit < 1:
            raise InputError("limit must be at least 1")
        prompts = prompts[:limit]
    if not prompts:
        raise InputError("no prompts to synthesise")
    return split, prompts


def synthesis_manifest(model: HookedChatModel, task: Task, cfg: SelfControlConfig, split: str | None) -> dict[str, Any]:
    """``manifest.json``: what the data is, for training (the fingerprint is what a resume checks)."""
    return {"kind": "synthesis", "format_version": FORMAT_VERSION, "model_id": model.model_id,
            "d_model": model.d_model, "n_layers": model.n_layers, "dtype": str(model.dtype).replace("torch.", ""),
            "task": task.judge_dict(), "config": config_dict(cfg), "state_point": STATE_POINT, "split": split}


def open_synthesis(data_dir: Path, fingerprint: dict[str, Any], manifest: dict[str, Any], prompts: Sequence[str],
                   *, restart: bool = False) -> list[tuple[int, str, str]]:
    """Check the run's settings, repair the folder, and list ``(index, key, prompt)`` still to do.

    The caller holds :func:`~workbench.store.folder_lock` on ``data_dir``.
    """
    check_fingerprint(data_dir, fingerprint, restart=restart, extendable=("prompts",),
                      outputs=(INDEX, RECORDS, MANIFEST))
    (data_dir / RECORDS).mkdir(parents=True, exist_ok=True)
    if not (data_dir / MANIFEST).is_file():
        atomic_write_json(data_dir / MANIFEST, manifest)
    _clean_temp(data_dir)
    done = {e["key"] for e in read_index(data_dir, repair=True)}
    keys = [record_key(i, p) for i, p in enumerate(prompts)]
    return [(i, k, p) for i, (k, p) in enumerate(zip(keys, prompts, strict=True)) if k not in done]


@dataclass
class SynthesisRecord:
    """One prompt's record as plain data (CPU tensors): the record folder's tensors and config, the index line."""

    key: str
    tensors: dict[str, Tensor]
    config: dict[str, Any]
    entry: dict[str, Any]


def compute_records(model: HookedChatModel, task: Task, chunk: Sequence[tuple[int, str, str]],
                    cfg: SelfControlConfig) -> list[SynthesisRecord]:
    """Search and capture each ``(index, key, prompt)`` of ``chunk`` (one :func:`search_prompts` call); no file access."""
    if not chunk:
        return []
    state_hooks = model.hook_names(None, STATE_POINT)
    start = time.perf_counter()
    results = search_prompts(model, [p for _, _, p in chunk], task, cfg, batch_size=len(chunk))
    seconds = (time.perf_counter() - start) / len(chunk)
    out = []
    for (i, key, prompt), result in zip(chunk, results, strict=True):
        clean = capture_states(model, result.prompt_ids, state_hooks)
        hidden = capture_states(model, result.prompt_ids, state_hooks, control=result.control)
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
            "seconds": round(seconds, 3),
        }
        out.append(SynthesisRecord(key, tensors, config, entry))
    return out


def commit_record(data_dir: Path, record: SynthesisRecord) -> None:
    """Write the record folder, then its index line (the commit; the caller holds the folder's lock)."""
    _write_record(data_dir, record.key, record.tensors, record.config)
    append_jsonl(data_dir / INDEX, record.entry)
