"""Compare control methods on held-out prompts, judged by the clean model and by judges independent of it.

Why both kinds of judge: SelfControl climbs the clean model's own suffix
score, so that score alone cannot tell whether the behaviour changed or the
judge was gamed. Fixed lexicons (NRC emotions for the emotion tasks, VADER
sentiment for all) move only when the text moves; perplexity under the clean
model and distinct-2 catch a control that buys its score with broken text.

Output folder (nothing is lost on interruption; a rerun resumes):

- ``results.jsonl``: one line per (task, method, prompt), appended, flushed
  and fsynced as soon as it is done; a rerun skips done lines and drops a
  torn last line;
- ``prepared.json``: per (method, task) setup, e.g. repe's chosen coefficient
  and the train-prompt grid it was chosen on (reused on rerun);
- ``config.json``: everything needed to rerun (``python -m workbench evaluate
  --config DIR/config.json`` resumes or repeats the run);
- ``summary.json`` / ``summary.csv`` / ``summary.md`` / ``summary.png``: per
  task and method, means with 95% bootstrap intervals and the change relative
  to ``none`` (paired by prompt, bootstrap interval of the paired differences).
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError
from tqdm.auto import tqdm

from ..errors import InputError
from ..selfcontrol.fluency import distinct_n, is_degenerate
from ..selfcontrol.suffix import score_responses
from ..selfcontrol.tasks import PromptList, Task, Text, get_task
from .judges import judge_text
from .methods import Decoding, Method, build_methods, run_isolated
from .report import CONFIG, PREPARED, RESULTS, read_records, write_json, write_summary

if TYPE_CHECKING:
    from ..model.chat_model import HookedChatModel

# Settings that must match for a rerun to append to an existing folder.
_RESUME_KEYS = ("model_id", "decoding", "method_settings")


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
def _key(record: Mapping[str, Any]) -> tuple[str, str, str]:
    return record["task"], record["method"], record["prompt"]


def _append(fh: Any, record: dict[str, Any]) -> None:
    fh.write(json.dumps(record) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


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


def _shared_settings(old: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both runs' settings cut to the methods and knobs they share: adding either does not block a resume."""
    both = [m for m in new if m in old]
    return ({m: {k: v for k, v in old[m].items() if k in new[m]} for m in both},
            {m: {k: v for k, v in new[m].items() if k in old[m]} for m in both})


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
    progress: bool = True,
) -> Evaluation:
    """Run every method on every prompt of every task, judge each response, write results and a summary.

    ``prompts``: a split name (``"test"``), a JSON file holding a list (for every
    task) or an object task id -> list, or the same as a Python list/dict.
    ``selfcontrol``: a :class:`~workbench.selfcontrol.search.SelfControlConfig` or dict of its
    fields; ``repe``: keyword arguments of :class:`~workbench.evaluation.methods.RepeAddition`.
    Decoding (``max_new_tokens``, ``seed``, sampling) is shared by all methods.
    A rerun into the same ``out_dir`` with the same settings resumes.
    """
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = [get_task(t) for t in tasks]
    if not tasks or len({t.id for t in tasks}) != len(tasks):
        raise InputError(f"tasks must be distinct and non-empty, got {[t.id for t in tasks]}")
    method_objs = build_methods(methods, prefix=prefix, selfcontrol=selfcontrol, repe=repe, prompt_style=prompt_style)
    decoding = Decoding(max_new_tokens, do_sample, temperature, top_p, seed)
    by_task = resolve_prompts(tasks, prompts, limit)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    config = {
        "command": f"python -m workbench evaluate --config {out / CONFIG}",
        "model_id": model.model_id,
        "model": {"load": model.model_id, "device": str(model.device), "dtype": str(model.dtype).replace("torch.", "")},
        "tasks": [t.id for t in tasks],
        "methods": [m.name for m in method_objs],
        "method_settings": {m.name: m.settings() for m in method_objs},
        "prompts_spec": str(prompts) if isinstance(prompts, str | Path) else "inline",
        "limit": limit,
        "prompts": by_task,
        "decoding": asdict(decoding),
        "prompt_style": prompt_style,
        "prefix": str(prefix) if prefix is not None else None,
        "versions": _versions(),
    }
    config_path = out / CONFIG
    if config_path.is_file() and (out / RESULTS).is_file():
        old = json.loads(config_path.read_text())
        for key in _RESUME_KEYS:
            old_value, new_value = old.get(key), json.loads(json.dumps(config[key]))
            if key == "method_settings":
                old_value, new_value = _shared_settings(old_value or {}, new_value)
            if old_value != new_value:
                raise InputError(f"{out} holds a run with different {key!r} ({old_value} vs {new_value}); "
                                 "resume with the same settings or choose another output folder")
    write_json(config_path, config)

    records = read_records(out / RESULTS, repair=True)
    done = {_key(r) for r in records}
    prepared: dict[str, dict[str, Any]] = json.loads((out / PREPARED).read_text()) if (out / PREPARED).is_file() else {}
    todo = [(t, p, m) for t in tasks for p in by_task[t.id] for m in method_objs if (t.id, m.name, p) not in done]
    bar = tqdm(total=len(todo), desc="evaluate", disable=not progress, unit="response")
    with (out / RESULTS).open("a", encoding="utf-8") as fh:
        for task in tasks:
            pending = [(p, m) for (t, p, m) in todo if t is task]
            if not pending:
                continue
            suffixes = task.compile(model)
            for method in method_objs:
                if any(m is method for _, m in pending):
                    bar.set_postfix_str(f"{task.id}: preparing {method.name}")
                    old_state = prepared.get(method.name, {}).get(task.id)
                    state = method.prepare(model, task, decoding, held_out=by_task[task.id], state=old_state)
                    if state:
                        prepared.setdefault(method.name, {})[task.id] = state
                        write_json(out / PREPARED, prepared)
            for index, prompt in enumerate(by_task[task.id]):
                plain_ids = None
                for method in method_objs:
                    if (task.id, method.name, prompt) in done:
                        continue
                    bar.set_postfix_str(f"{task.id} #{index} {method.name}")
                    response = run_isolated(model, method, task, prompt, decoding)
                    plain_ids = plain_ids or model.chat_ids(prompt)
                    record = {
                        "task": task.id, "method": method.name, "prompt_index": index, "prompt": prompt,
                        "response": model.decode(response.response_ids), "response_ids": response.response_ids,
                        "seconds": round(response.seconds, 4),
                        **judge_response(model, task, plain_ids, response.response_ids, suffixes),
                        "info": response.info,
                    }
                    _append(fh, record)
                    records.append(record)
                    done.add(_key(record))
                    bar.update(1)
    bar.close()
    summary = write_summary(out)
    wanted = {(t.id, m.name, p) for t in tasks for m in method_objs for p in by_task[t.id]}
    return Evaluation(out, [r for r in records if _key(r) in wanted], summary)


def evaluate_from_config(config_path: str | Path, model: HookedChatModel | None = None, progress: bool = True) -> Evaluation:
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
                    prompt_style=cfg.get("prompt_style", "user"), progress=progress)
