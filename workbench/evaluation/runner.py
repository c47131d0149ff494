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

import csv
import json
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from .. import plotting
from ..errors import InputError
from ..selfcontrol.fluency import distinct_n, is_degenerate
from ..selfcontrol.suffix import score_responses
from ..selfcontrol.tasks import Task, get_task
from .judges import bootstrap_ci, judge_text
from .methods import Decoding, Method, build_methods, run_isolated

if TYPE_CHECKING:
    from ..model.chat_model import HookedChatModel

RESULTS = "results.jsonl"
PREPARED = "prepared.json"
CONFIG = "config.json"
METRICS = ("suffix_score", "lexicon_target_rate", "lexicon_opposite_rate", "vader_compound", "perplexity",
           "distinct_2", "seconds")
"""Per-response metrics summarised per (task, method)."""
LABELS = {"suffix_score": "suffix score (clean model)", "lexicon_target_rate": "NRC target-emotion rate",
          "lexicon_opposite_rate": "NRC opposite-emotion rate", "vader_compound": "VADER compound",
          "perplexity": "perplexity (clean model)", "distinct_2": "distinct-2", "seconds": "seconds per prompt"}
# Settings that must match for a rerun to append to an existing folder.
_RESUME_KEYS = ("model_id", "decoding", "method_settings")


# ---------------------------------------------------------------- prompts
def resolve_prompts(tasks: Sequence[Task], prompts: str | Path | Sequence[str] | Mapping[str, Sequence[str]],
                    limit: int | None = None) -> dict[str, list[str]]:
    """Prompts per task id from a split name, a JSON file (list, or object task id -> list), a list or a dict."""
    spec: Any = prompts
    if isinstance(prompts, Path) or (isinstance(prompts, str) and (prompts.endswith(".json") or Path(prompts).is_file())):
        path = Path(prompts)
        try:
            spec = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read prompts file {path}: {err}") from err
    if isinstance(spec, str):
        out = {t.id: t.split(spec) for t in tasks}
    elif isinstance(spec, Mapping):
        missing = [t.id for t in tasks if t.id not in spec]
        if missing:
            raise InputError(f"the prompts object has no prompts for task(s) {missing}; it has {sorted(spec)}")
        out = {t.id: list(spec[t.id]) for t in tasks}
    elif isinstance(spec, Sequence):
        out = {t.id: list(spec) for t in tasks}
    else:
        raise InputError(f"prompts must be a split name, a JSON file, a list or a dict, got {type(spec).__name__}")
    for task_id, items in out.items():
        if not items or not all(isinstance(p, str) and p.strip() for p in items):
            raise InputError(f"prompts for task {task_id!r} must be a non-empty list of non-empty strings")
        if len(set(items)) != len(items):
            raise InputError(f"prompts for task {task_id!r} contain duplicates; each prompt is evaluated once")
    if limit is not None:
        if limit < 1:
            raise InputError(f"limit must be >= 1, got {limit}")
        out = {k: v[:limit] for k, v in out.items()}
    return out


# ---------------------------------------------------------------- results file
def read_records(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """The records in a ``results.jsonl``; a torn last line (killed mid-write) is skipped, and cut off with ``repair``."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    records, good_end, offset = [], 0, 0
    for line in data.splitlines(keepends=True):
        offset += len(line)
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no newline")
            if line.strip():
                records.append(json.loads(line))
            good_end = offset
        except ValueError:
            if offset != len(data):
                raise InputError(f"{path} has a corrupt line in the middle (byte {offset - len(line)}); fix or remove it") from None
    if repair and good_end != len(data):
        with path.open("r+b") as fh:
            fh.truncate(good_end)
    return records


def _key(record: Mapping[str, Any]) -> tuple[str, str, str]:
    return record["task"], record["method"], record["prompt"]


def _append(fh: Any, record: dict[str, Any]) -> None:
    fh.write(json.dumps(record) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


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
    ``selfcontrol``: a :class:`~workbench.search.SelfControlConfig` or dict of its
    fields; ``repe``: keyword arguments of :class:`~workbench.methods.RepeAddition`.
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
    _write_json(config_path, config)

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
                        _write_json(out / PREPARED, prepared)
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


# ---------------------------------------------------------------- summary
def _values(records: Sequence[Mapping[str, Any]], metric: str) -> dict[str, float]:
    """prompt -> value, skipping missing / non-finite values (e.g. perplexity of an empty response)."""
    out = {}
    for r in records:
        v = r.get(metric)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[r["prompt"]] = float(v)
    return out


def summarize(records: Sequence[Mapping[str, Any]], tasks: Sequence[str] | None = None,
              methods: Sequence[str] | None = None, prepared: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Per task and method: n, mean and 95% bootstrap CI per metric, and the paired change relative to ``none``."""
    tasks = list(tasks) if tasks is not None else list(dict.fromkeys(r["task"] for r in records))
    methods = list(methods) if methods is not None else list(dict.fromkeys(r["method"] for r in records))
    out: dict[str, Any] = {}
    for task in tasks:
        per_method = {m: [r for r in records if r["task"] == task and r["method"] == m] for m in methods}
        base = per_method.get("none") or []
        out[task] = {}
        for method, rows in per_method.items():
            if not rows:
                continue
            entry: dict[str, Any] = {"n": len(rows), "n_degenerate": sum(bool(r.get("degenerate")) for r in rows)}
            for metric in METRICS:
                values = _values(rows, metric)
                if not values:
                    continue
                mean, low, high = bootstrap_ci(list(values.values()))
                entry[f"{metric}_mean"] = mean
                entry[f"{metric}_ci95"] = [low, high]
                if metric == "perplexity" and len(values) < len(rows):
                    entry["perplexity_n"] = len(values)
                if method != "none" and base:
                    ref = _values(base, metric)
                    shared = [p for p in values if p in ref]
                    if shared:
                        diff = [values[p] - ref[p] for p in shared]
                        d_mean, d_low, d_high = bootstrap_ci(diff)
                        entry[f"{metric}_delta_vs_none"] = d_mean
                        entry[f"{metric}_delta_ci95"] = [d_low, d_high]
            if method == "selfcontrol":
                gains = [r["info"]["gain"] for r in rows if "gain" in r.get("info", {})]
                if gains:
                    entry["search_gain_mean"] = float(np.mean(gains))
                    entry["search_accepted_fraction"] = float(np.mean([r["info"]["iterations_accepted"] > 0 for r in rows]))
            state = (prepared or {}).get(method, {}).get(task)
            if state and "coefficient" in state:
                entry["coefficient"] = state["coefficient"]
            out[task][method] = entry
    return out


def _fmt(entry: Mapping[str, Any], metric: str, digits: int = 3) -> str:
    if f"{metric}_mean" not in entry:
        return ""
    low, high = entry[f"{metric}_ci95"]
    return f"{entry[f'{metric}_mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _fmt_delta(entry: Mapping[str, Any], metric: str, digits: int = 3) -> str:
    if f"{metric}_delta_vs_none" not in entry:
        return ""
    low, high = entry[f"{metric}_delta_ci95"]
    star = "*" if low > 0 or high < 0 else ""
    return f"{entry[f'{metric}_delta_vs_none']:+.{digits}f}{star}"


def markdown_table(summary: Mapping[str, Any]) -> str:
    """One row per (task, method); Δ is the paired change vs ``none`` (* = 95% interval excludes 0)."""
    lexicon = any("lexicon_target_rate_mean" in e for t in summary.values() for e in t.values())
    head = ["task", "method", "n", "suffix score [95% CI]", "Δ"]
    if lexicon:
        head += ["NRC target rate [95% CI]", "Δ", "NRC opposite rate", "Δ"]
    head += ["VADER [95% CI]", "Δ", "perplexity", "distinct-2", "s / prompt", "degenerate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, methods in summary.items():
        for method, e in methods.items():
            name = method + (f" (c={e['coefficient']:g})" if "coefficient" in e else "")
            row = [task, name, str(e["n"]), _fmt(e, "suffix_score", 4), _fmt_delta(e, "suffix_score", 4)]
            if lexicon:
                row += [_fmt(e, "lexicon_target_rate"), _fmt_delta(e, "lexicon_target_rate"),
                        f"{e['lexicon_opposite_rate_mean']:.3f}" if "lexicon_opposite_rate_mean" in e else "",
                        _fmt_delta(e, "lexicon_opposite_rate")]
            row += [_fmt(e, "vader_compound", 2), _fmt_delta(e, "vader_compound", 2),
                    f"{e['perplexity_mean']:.1f}" if "perplexity_mean" in e else "",
                    f"{e['distinct_2_mean']:.2f}" if "distinct_2_mean" in e else "",
                    f"{e['seconds_mean']:.1f}" if "seconds_mean" in e else "", str(e["n_degenerate"])]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_csv(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Flat CSV: one row per (task, method), mean / CI / paired delta / delta CI per metric."""
    columns = ["task", "method", "n", "n_degenerate", "coefficient"]
    for m in METRICS:
        columns += [f"{m}_mean", f"{m}_ci_low", f"{m}_ci_high", f"{m}_delta_vs_none", f"{m}_delta_ci_low", f"{m}_delta_ci_high"]
    path = Path(path)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        for task, methods in summary.items():
            for method, e in methods.items():
                row: dict[str, Any] = {"task": task, "method": method, "n": e["n"], "n_degenerate": e["n_degenerate"],
                                       "coefficient": e.get("coefficient", "")}
                for m in METRICS:
                    if f"{m}_mean" in e:
                        row[f"{m}_mean"] = e[f"{m}_mean"]
                        row[f"{m}_ci_low"], row[f"{m}_ci_high"] = e[f"{m}_ci95"]
                    if f"{m}_delta_vs_none" in e:
                        row[f"{m}_delta_vs_none"] = e[f"{m}_delta_vs_none"]
                        row[f"{m}_delta_ci_low"], row[f"{m}_delta_ci_high"] = e[f"{m}_delta_ci95"]
                writer.writerow(row)
    return path


def plot_summary(summary: Mapping[str, Any], path: str | Path, model_id: str = "") -> Path:
    """Grouped bars (tasks x methods) with 95% CI error bars: suffix score, NRC target rate (or VADER), VADER."""
    tasks = list(summary)
    methods = list(dict.fromkeys(m for t in summary.values() for m in t))
    lexicon = any("lexicon_target_rate_mean" in e for t in summary.values() for e in t.values())
    panels = ["suffix_score", "lexicon_target_rate", "vader_compound"] if lexicon else ["suffix_score", "vader_compound"]
    fig, axes = plotting.figure(1, len(panels), width=max(4.0, 1.1 * len(tasks) + 1.5) * 0.75, height=4.2)
    width = 0.8 / max(1, len(methods))
    colors = plotting.task_colors(methods)
    for ax, metric in zip(axes[0], panels, strict=True):
        for j, method in enumerate(methods):
            xs, ys, err = [], [], [[], []]
            for i, task in enumerate(tasks):
                e = summary[task].get(method, {})
                if f"{metric}_mean" not in e:
                    continue
                mean, (low, high) = e[f"{metric}_mean"], e[f"{metric}_ci95"]
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(mean)
                err[0].append(mean - low)
                err[1].append(high - mean)
            if xs:
                ax.bar(xs, ys, width, yerr=err, capsize=2, color=colors[method], label=method, error_kw={"lw": 0.8})
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
        ax.set_xlabel("task")
        ax.set_ylabel(LABELS[metric])
        ax.set_title(LABELS[metric], fontsize=9)
        ax.grid(False, axis="x")
        if metric == "suffix_score":
            values = [e[f"{metric}_ci95"][k] for t in summary.values() for e in t.values() if f"{metric}_ci95" in e for k in (0, 1)]
            if values:
                pad = 0.1 * (max(values) - min(values) + 1e-4)
                ax.set_ylim(min(values) - pad, max(values) + pad)
                ax.set_ylabel(LABELS[metric] + " (axis cut)")
        if metric == "vader_compound":
            ax.axhline(0, color="black", lw=0.6)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8, title="method", title_fontsize=8)
    fig.suptitle(f"Control methods on {model_id or 'the model'}: means with 95% bootstrap intervals", fontsize=10)
    return plotting.save(fig, path)


def write_summary(out_dir: str | Path) -> dict[str, Any]:
    """(Re)build summary.json / .csv / .md / .png from the folder's results, for the tasks and methods of its config."""
    out = Path(out_dir)
    config = json.loads((out / CONFIG).read_text()) if (out / CONFIG).is_file() else {}
    records = read_records(out / RESULTS)
    prepared = json.loads((out / PREPARED).read_text()) if (out / PREPARED).is_file() else {}
    tasks = config.get("tasks") or None
    methods = config.get("methods") or None
    if config.get("prompts"):
        records = [r for r in records if r["prompt"] in set(config["prompts"].get(r["task"], []))]
    per_task = summarize(records, tasks, methods, prepared)
    table = dict(per_task)
    pooled = None
    if len([t for t in per_task if per_task[t]]) > 1:
        # every task's prompts together: more prompts per method, so tighter intervals (paired by task and prompt)
        relabelled = [{**r, "task": "all", "prompt": f"{r['task']}::{r['prompt']}"} for r in records
                      if tasks is None or r["task"] in tasks]
        pooled = summarize(relabelled, ["all"], methods)["all"]
        table["all tasks (pooled)"] = pooled
    summary = {
        "model_id": config.get("model_id"),
        "decoding": config.get("decoding"),
        "methods": methods,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "notes": "means with 95% percentile-bootstrap intervals; *_delta_vs_none: mean paired difference "
                 "(same prompt) to method 'none' with its bootstrap interval",
        "tasks": per_task,
    }
    if pooled is not None:
        summary["pooled"] = pooled
    _write_json(out / "summary.json", summary)
    write_csv(table, out / "summary.csv")
    (out / "summary.md").write_text(
        f"Evaluation on `{summary['model_id']}` (Δ: paired change vs `none`; * = 95% bootstrap interval excludes 0)\n\n"
        + markdown_table(table) + "\n")
    if any(per_task.values()):
        plot_summary(per_task, out / "summary.png", summary["model_id"] or "")
    return summary
