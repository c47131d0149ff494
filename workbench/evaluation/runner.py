"""Compare control methods on held-out prompts, judged by the clean model and by judges independent of it.

Why both kinds of judge: SelfControl climbs the clean model's own suffix
score, so that score alone cannot tell whether the behaviour changed or the
judge was gamed. Fixed lexicons (NRC emotions for the emotion tasks, VADER
sentiment for all) move only when the text moves; perplexity under the clean
model and distinct-2 catch a control that buys its score with broken text.

Output folder (nothing is lost on interruption; a rerun resumes, and a
resumed run is provably the same run or it is refused):

- ``run.json``: the run's fingerprint (:func:`run_fingerprint`): model id and
  a fingerprint of its weights, dtype, device type, judges version, each
  task's judge text, the prompt set, decoding and each method's settings
  (a prefix controller by content hash). A rerun that differs in any of them
  is refused naming the keys (another ``--out``, or ``--restart``); one that
  adds a task or method extends it, one with fewer never shrinks it;
- ``results.jsonl``: one line per (task, method, prompt), appended and
  fsynced as soon as it is done (:func:`workbench.store.append_jsonl`); a
  rerun skips done lines and drops a torn last line;
- ``prepared.json``: per (method, task) setup, e.g. repe's chosen coefficient
  and the train-prompt grid it was chosen on (reused on rerun, refused if
  those prompts are now evaluated);
- ``config.json``: everything needed to rerun (``python -m workbench evaluate
  --config DIR/config.json`` resumes or repeats the run), the union of every
  run into the folder;
- ``summary.json`` / ``summary.csv`` / ``summary.md`` / ``summary.png``: per
  task and method, means with 95% bootstrap intervals and the change relative
  to ``none`` (paired by prompt, bootstrap interval of the paired differences).
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Container, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError
from tqdm.auto import tqdm

from ..errors import InputError
from ..selfcontrol.fluency import distinct_n, is_degenerate
from ..selfcontrol.suffix import score_responses
from ..selfcontrol.tasks import PromptList, Task, Text, get_task
from ..store import (
    append_jsonl,
    atomic_write_json,
    check_fingerprint,
    folder_lock,
    model_fingerprint,
    read_jsonl,
)
from .judges import JUDGES_VERSION, judge_text
from .methods import Decoding, Method, build_methods, run_isolated_many
from .report import CONFIG, PREPARED, RESULTS, write_summary

if TYPE_CHECKING:
    from ..model.chat_model import HookedChatModel

#: The run's files (relative to its folder): deleted by ``restart``; present without a fingerprint, refused.
OUTPUTS = (RESULTS, PREPARED, CONFIG, "summary.json", "summary.csv", "summary.md", "summary.png")


# ---------------------------------------------------------------- prompts
#: A prompt set: one list for every task, or an object from task id to that task's list.
_PROMPT_LIST: TypeAdapter[tuple[str, ...]] = TypeAdapter(PromptList)
_PROMPTS_PER_TASK: TypeAdapter[dict[str, tuple[str, ...]]] = TypeAdapter(dict[Text, PromptList])


def resolve_prompts(tasks: Sequence[Task], prompts: str | Path | Sequence[str] | Mapping[str, Sequence[str]],
                    limit: int | None = None) -> dict[str, list[str]]:
    """Prompts per task id from a split name, a JSON file (list, or object task id -> list), a list or a dict.

    Files and objects are checked against the same schema as a task's prompt
    splits: a bare string where a list belongs is refused (it would be read
    as one prompt per character), and the message names the file and the task.
    """
    spec: Any = prompts
    source = "prompts"
    if isinstance(prompts, Path) or (isinstance(prompts, str) and (prompts.endswith(".json") or Path(prompts).is_file())):
        path = Path(prompts)
        try:
            spec = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read prompts file {path}: {err}") from err
        source = f"prompts file {path}"
        if not isinstance(spec, list | dict):
            raise InputError(f"{source} must hold a list of prompts or an object {{task id: list of prompts}}, "
                             f"got {type(spec).__name__}")
    if isinstance(spec, str):
        out = {t.id: t.split(spec) for t in tasks}
    elif isinstance(spec, Mapping | list | tuple):
        try:
            if isinstance(spec, Mapping):
                per_task = _PROMPTS_PER_TASK.validate_python(dict(spec))
            else:
                per_task = dict.fromkeys((t.id for t in tasks), _PROMPT_LIST.validate_python(spec))
        except ValidationError as err:
            raise InputError.from_validation(err, source) from None
        missing = [t.id for t in tasks if t.id not in per_task]
        if missing:
            raise InputError(f"{source} has no prompts for task(s) {missing}; it has {sorted(per_task)}")
        out = {t.id: list(per_task[t.id]) for t in tasks}
    else:
        raise InputError(f"prompts must be a split name, a JSON file, a list or a dict, got {type(spec).__name__}")
    for task_id, items in out.items():
        if len(set(items)) != len(items):
            raise InputError(f"prompts for task {task_id!r} contain duplicates; each prompt is evaluated once")
    if limit is not None:
        if limit < 1:
            raise InputError(f"limit must be >= 1, got {limit}")
        out = {k: v[:limit] for k, v in out.items()}
    return out


# ---------------------------------------------------------------- results file
def result_key(record: Mapping[str, Any]) -> tuple[str, str, str]:
    """What identifies an evaluation record: (task, method, prompt); the local and the Ray runs key alike."""
    return record["task"], record["method"], record["prompt"]


# ---------------------------------------------------------------- metrics
def judge_response(model: HookedChatModel, task: Task, prompt_ids: list[int], response_ids: list[int],
                   suffixes: Any) -> dict[str, Any]:
    """Every metric of one response: clean suffix score and perplexity (given the plain prompt), text judges."""
    scored = score_responses(model, [prompt_ids], [response_ids], suffixes)
    nll = float(scored.nll[0])
    text = model.decode(response_ids)
    judged = judge_text(text, task.lexicon)
    return {
        "suffix_score": float(scored.scores[0]),
        "nll": nll if math.isfinite(nll) else None,
        "perplexity": math.exp(nll) if math.isfinite(nll) else None,
        **judged,
        "distinct_2": distinct_n(response_ids, 2),
        "degenerate": is_degenerate(response_ids),
        "n_tokens": len(response_ids),
    }


# ---------------------------------------------------------------- runner
@dataclass
class Evaluation:
    """What :func:`evaluate` wrote and its summary."""

    out_dir: Path
    records: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def table(self) -> str:
        return (self.out_dir / "summary.md").read_text()

    def _repr_html_(self) -> str:
        """Jupyter's view: the summary table and figure."""
        from .. import display

        return display.card(f"Evaluation of {len(self.records)} responses in {self.out_dir}",
                            display.markdown_table(self.table), display.image(self.out_dir / "summary.png", "method comparison"))


def run_fingerprint(model: HookedChatModel, tasks: Sequence[Task], methods: Sequence[Method],
                    prompts: Mapping[str, Sequence[str]], decoding: Decoding) -> dict[str, Any]:
    """Everything that changes an evaluation's numbers, for :func:`workbench.store.check_fingerprint`.

    ``tasks``, ``prompts`` and ``methods`` are keyed by task id, ``task#position``
    and method name, so a run may add entries (they are *extendable*: another
    task or method, more prompts of the same list) but never change one: the
    prompt at each position of each task's list is pinned, so another split or
    prompt file into the same folder is refused.
    """
    return {
        "model": model_fingerprint(model),
        "judges_version": JUDGES_VERSION,
        "decoding": asdict(decoding),
        "tasks": {t.id: t.judge_dict() for t in tasks},
        "prompts": {f"{t.id}#{i}": p for t in tasks for i, p in enumerate(prompts[t.id])},
        "methods": {m.name: m.fingerprint(model, tasks) for m in methods},
    }


EXTENDABLE = ("tasks", "prompts", "methods")


def _merged_config(path: Path, new: dict[str, Any]) -> dict[str, Any]:
    """The folder's config grown by ``new`` (tasks, methods, prompts and settings are unions; never shrinks)."""
    if not path.is_file():
        return new
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return new
    if not isinstance(old, dict):
        return new
    merged = {**old, **new}
    for key in ("tasks", "methods"):
        merged[key] = list(dict.fromkeys([*(old.get(key) or []), *new[key]]))
    merged["method_settings"] = {**(old.get("method_settings") or {}), **new["method_settings"]}
    old_prompts = old.get("prompts") or {}  # per task, one list is the start of the other (the fingerprint saw to it)
    merged["prompts"] = {**old_prompts, **{t: max(p, old_prompts.get(t) or [], key=len) for t, p in new["prompts"].items()}}
    merged["prefix"] = new["prefix"] if new["prefix"] is not None else old.get("prefix")
    merged["prompt_style"] = (merged["method_settings"].get("prompt") or {}).get("style", new["prompt_style"])
    return merged


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "transformer-lens", "nrclex", "vaderSentiment"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def evaluate(
    model: HookedChatModel,
    tasks: Sequence[Task | str] | str,
    methods: Sequence[str | Method] | str,
    prompts: str | Path | Sequence[str] | Mapping[str, Sequence[str]],
    out_dir: str | Path,
    *,
    prefix: str | Path | None = None,
    max_new_tokens: int = 40,
    seed: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float | None = None,
    limit: int | None = None,
    selfcontrol: Any = None,
    repe: dict[str, Any] | None = None,
    prompt_style: str = "user",
    batch_prompts: int | None = None,
    restart: bool = False,
    progress: bool = True,
) -> Evaluation:
    """Run every method on every prompt of every task, judge each response, write results and a summary.

    ``prompts``: a split name (``"test"``), a JSON file holding a list (for every
    task) or an object task id -> list, or the same as a Python list/dict.
    ``selfcontrol``: a :class:`~workbench.selfcontrol.search.SelfControlConfig` or dict of its
    fields; ``repe``: keyword arguments of :class:`~workbench.evaluation.methods.RepeAddition`.
    Decoding (``max_new_tokens``, ``seed``, sampling) is shared by all methods. ``batch_prompts``: prompts
    SelfControl searches together (default: the model's ``default_batch_prompts``; results do not depend on it).
    A rerun into the same ``out_dir`` with the same settings resumes (and may add tasks or methods); one with
    other settings raises :class:`~workbench.errors.ResumeMismatchError` unless ``restart``, which discards the
    folder's results first. A second process writing the same folder is refused while the first is alive.
    """
    tasks, method_objs, decoding, by_task = evaluation_inputs(
        tasks, methods, prompts, prefix=prefix, max_new_tokens=max_new_tokens, seed=seed, do_sample=do_sample,
        temperature=temperature, top_p=top_p, limit=limit, selfcontrol=selfcontrol, repe=repe,
        prompt_style=prompt_style, batch_prompts=batch_prompts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out):
        records = open_evaluation(
            out, run_fingerprint(model, tasks, method_objs, by_task, decoding),
            evaluation_config(model, tasks, method_objs, by_task, decoding, out, prompts=prompts, limit=limit,
                              prompt_style=prompt_style, prefix=prefix), restart=restart)
        records = _run(model, tasks, method_objs, by_task, decoding, out, records, progress)
        summary = write_summary(out)
    wanted = {(t.id, m.name, p) for t in tasks for m in method_objs for p in by_task[t.id]}
    return Evaluation(out, [r for r in records if result_key(r) in wanted], summary)


# ---- the pieces of a run: inputs, open the folder, prepare, respond and judge, commit ------
# Split so that a sharded run (workbench.distributed) answers on workers and writes on the
# driver with the very same functions.
def evaluation_inputs(tasks: Sequence[Task | str] | str, methods: Sequence[str | Method] | str,
                      prompts: str | Path | Sequence[str] | Mapping[str, Sequence[str]], *,
                      prefix: str | Path | None = None, max_new_tokens: int = 40, seed: int = 0,
                      do_sample: bool = False, temperature: float = 1.0, top_p: float | None = None,
                      limit: int | None = None, selfcontrol: Any = None, repe: dict[str, Any] | None = None,
                      prompt_style: str = "user", batch_prompts: int | None = None,
                      ) -> tuple[list[Task], list[Method], Decoding, dict[str, list[str]]]:
    """Tasks, method objects, decoding and prompts per task, checked (bad input fails here, before any model work)."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = [get_task(t) for t in tasks]
    if not tasks or len({t.id for t in tasks}) != len(tasks):
        raise InputError(f"tasks must be distinct and non-empty, got {[t.id for t in tasks]}")
    method_objs = build_methods(methods, prefix=prefix, selfcontrol=selfcontrol, repe=repe, prompt_style=prompt_style,
                                batch_prompts=batch_prompts)
    decoding = Decoding(max_new_tokens, do_sample, temperature, top_p, seed)
    return tasks, method_objs, decoding, resolve_prompts(tasks, prompts, limit)


def evaluation_config(model: HookedChatModel, tasks: Sequence[Task], method_objs: Sequence[Method],
                      by_task: Mapping[str, list[str]], decoding: Decoding, out: Path, *,
                      prompts: Any, limit: int | None, prompt_style: str, prefix: str | Path | None) -> dict[str, Any]:
    """``config.json``: everything needed to rerun the evaluation."""
    return {
        "command": f"python -m workbench evaluate --config {out / CONFIG}",
        "model_id": model.model_id,
        "model": {"load": model.model_id, "device": str(model.device), "dtype": str(model.dtype).replace("torch.", "")},
        "tasks": [t.id for t in tasks],
        "methods": [m.name for m in method_objs],
        "method_settings": {m.name: m.settings() for m in method_objs},
        "prompts_spec": str(prompts) if isinstance(prompts, str | Path) else "inline",
        "limit": limit,
        "prompts": dict(by_task),
        "decoding": asdict(decoding),
        "prompt_style": prompt_style,
        "prefix": str(prefix) if prefix is not None else None,
        "versions": _versions(),
    }


def open_evaluation(out: Path, fingerprint: dict[str, Any], config: dict[str, Any], *,
                    restart: bool = False) -> list[dict[str, Any]]:
    """Check the run's settings, write its config, and return the results already there (the caller holds the lock)."""
    check_fingerprint(out, fingerprint, restart=restart, extendable=EXTENDABLE, outputs=OUTPUTS)
    atomic_write_json(out / CONFIG, _merged_config(out / CONFIG, config))
    return read_jsonl(out / RESULTS)


def read_prepared(out: Path) -> dict[str, dict[str, Any]]:
    """``prepared.json``: per method and task, the setup state an earlier run chose (reused as is)."""
    return json.loads((out / PREPARED).read_text()) if (out / PREPARED).is_file() else {}


def prepare_methods(model: HookedChatModel, task: Task, method_objs: Sequence[Method], decoding: Decoding,
                    held_out: Sequence[str], prepared: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each method's setup for ``task`` (from ``prepared``'s state where there is one); the states to save, by method."""
    states = {}
    for method in method_objs:
        old_state = prepared.get(method.name, {}).get(task.id)
        state = method.prepare(model, task, decoding, held_out=held_out, state=old_state)
        if state:
            states[method.name] = state
    return states


def respond_and_judge(model: HookedChatModel, task: Task, method_objs: Sequence[Method],
                      chunk: Sequence[tuple[int, str]], decoding: Decoding, suffixes: Any,
                      done: Container[tuple[str, str, str]] = ()) -> Iterator[dict[str, Any]]:
    """The judged record of every (method, prompt) of ``chunk`` not in ``done``, as each method's call returns.

    ``chunk``: ``(index, prompt)`` pairs of ``task``; each method answers all of
    its pending prompts in one call (a batched search answers them together).
    No file access: the caller commits each record.
    """
    plain: dict[str, list[int]] = {}
    for method in method_objs:
        mine = [(i, p) for i, p in chunk if (task.id, method.name, p) not in done]
        if not mine:
            continue
        responses = run_isolated_many(model, method, task, [p for _, p in mine], decoding)
        for (index, prompt), response in zip(mine, responses, strict=True):
            plain_ids = plain.setdefault(prompt, model.chat_ids(prompt))
            yield {
                "task": task.id, "method": method.name, "prompt_index": index, "prompt": prompt,
                "response": model.decode(response.response_ids), "response_ids": response.response_ids,
                "seconds": round(response.seconds, 4),
                **judge_response(model, task, plain_ids, response.response_ids, suffixes),
                "info": response.info,
            }


def chunk_size(method_objs: Sequence[Method], model: HookedChatModel) -> int:
    """Prompts per chunk: the largest ``prompts_per_call`` of the methods (``None``: the model's default batch)."""
    from ..selfcontrol.search import default_batch_prompts

    return max(m.prompts_per_call or default_batch_prompts(model) for m in method_objs)


def _run(model: HookedChatModel, tasks: Sequence[Task], method_objs: Sequence[Method], by_task: dict[str, list[str]],
         decoding: Decoding, out: Path, records: list[dict[str, Any]], progress: bool) -> list[dict[str, Any]]:
    """Every missing (task, method, prompt) response, judged and appended to the results (the caller holds the lock).

    Prompts go in chunks of :func:`chunk_size`; each record is committed as
    soon as its method's call returns.
    """
    done = {result_key(r) for r in records}
    prepared = read_prepared(out)
    todo = [(t, p, m) for t in tasks for p in by_task[t.id] for m in method_objs if (t.id, m.name, p) not in done]
    bar = tqdm(total=len(todo), desc="evaluate", disable=not progress, unit="response")
    size = chunk_size(method_objs, model)
    for task in tasks:
        pending = [(p, m) for (t, p, m) in todo if t is task]
        if not pending:
            continue
        suffixes = task.compile(model)
        bar.set_postfix_str(f"{task.id}: preparing")
        busy = [m for m in method_objs if any(pm is m for _, pm in pending)]
        states = prepare_methods(model, task, busy, decoding, by_task[task.id], prepared)
        if states:
            for name, state in states.items():
                prepared.setdefault(name, {})[task.id] = state
            atomic_write_json(out / PREPARED, prepared)
        prompts = list(enumerate(by_task[task.id]))
        for first in range(0, len(prompts), size):
            bar.set_postfix_str(f"{task.id} #{first}")
            for record in respond_and_judge(model, task, method_objs, prompts[first:first + size], decoding,
                                            suffixes, done):
                append_jsonl(out / RESULTS, record)
                records.append(record)
                done.add(result_key(record))
                bar.update(1)
    bar.close()
    return records


def evaluate_from_config(config_path: str | Path, model: HookedChatModel | None = None, progress: bool = True,
                         restart: bool = False) -> Evaluation:
    """Rerun (or resume) the evaluation a ``config.json`` describes, into the folder it sits in."""
    path = Path(config_path)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read evaluation config {path}: {err}") from err
    needed = ("model", "tasks", "methods", "prompts", "decoding")
    if not isinstance(cfg, dict) or not all(key in cfg for key in needed) or not isinstance(cfg["model"], dict):
        raise InputError(f"{path} is not an evaluation config (it lacks {', '.join(needed)}); pass the {CONFIG} "
                         "that `evaluate` wrote into an earlier run's --out folder")
    if model is None:
        from ..model.loading import load_model

        model = load_model(cfg["model"]["load"], device=cfg["model"].get("device"), dtype=cfg["model"].get("dtype"),
                           progress=progress)
    settings = cfg.get("method_settings", {})
    sc = settings.get("selfcontrol")
    if sc is not None and sc.get("layers") is not None:
        sc = {**sc, "layers": tuple(sc["layers"])}
    return evaluate(model, cfg["tasks"], cfg["methods"], cfg["prompts"], path.parent, prefix=cfg.get("prefix"),
                    **asdict(Decoding(**cfg["decoding"])), selfcontrol=sc, repe=settings.get("repe"),
                    prompt_style=cfg.get("prompt_style", "user"), restart=restart, progress=progress)
