"""Summaries of an evaluation: statistics per task and method, Markdown, CSV and a figure.

Why apart from the runner: a summary is rebuilt from ``results.jsonl`` alone
(``evaluate --summary-only``), and its statistics decide what a table claims,
so they live in one place that the runner, the CLI and the studies share.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import plotting
from ..errors import InputError
from ..store import atomic_write, atomic_write_json, read_jsonl
from .judges import MIN_N_SIGNIFICANCE, bootstrap_ci, paired_change

METRICS = ("suffix_score", "lexicon_target_rate", "lexicon_opposite_rate", "vader_compound", "perplexity",
           "distinct_2", "seconds")
"""Per-response metrics summarised per (task, method)."""
RESULTS = "results.jsonl"
PREPARED = "prepared.json"
CONFIG = "config.json"

LABELS = {"suffix_score": "suffix score (clean model)", "lexicon_target_rate": "NRC target-emotion rate",
          "lexicon_opposite_rate": "NRC opposite-emotion rate", "vader_compound": "VADER compound",
          "perplexity": "perplexity (clean model)", "distinct_2": "distinct-2", "seconds": "seconds per prompt"}


# ---------------------------------------------------------------- the folder
def read_records(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """The records in a ``results.jsonl`` (:func:`workbench.store.read_jsonl`: a torn last line is dropped).

    Only the folder's writer (holding its lock) passes ``repair=True`` to cut
    the torn line off; a summary of a folder another process may be appending
    to must not cut its line in flight.
    """
    return read_jsonl(path, repair=repair)


# ---------------------------------------------------------------- statistics
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
                entry[f"{metric}_ci95"] = [low, high] if len(values) >= 2 else None  # no interval from one value
                if metric == "perplexity" and len(values) < len(rows):
                    entry["perplexity_n"] = len(values)
                if method != "none" and base:
                    ref = _values(base, metric)
                    shared = [p for p in values if p in ref]
                    if shared:
                        change = paired_change([values[p] for p in shared], [ref[p] for p in shared])
                        entry[f"{metric}_delta_vs_none"] = change["mean"]
                        entry[f"{metric}_delta_ci95"] = change["ci"]
                        entry[f"{metric}_delta_n"] = change["n"]
                        entry[f"{metric}_delta_p_t"] = None if math.isnan(change["p_t"]) else change["p_t"]
                        entry[f"{metric}_delta_p_sign"] = change["p_sign"]
                        entry[f"{metric}_delta_significant"] = change["significant"]
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


SIGNIFICANCE_RULE = (
    f"Δ: mean paired change vs `none` (same prompts); * = at least {MIN_N_SIGNIFICANCE} pairs, the 95% bootstrap "
    f"interval of the paired differences excludes 0 and a paired t-test gives p < 0.05 (below {MIN_N_SIGNIFICANCE} "
    f"pairs even six-of-six same-sign changes are not significant by an exact sign test, so nothing is marked); "
    "no interval is shown for n < 2")
"""The table legend: what a mark means and why small samples get none."""


def _fmt(entry: Mapping[str, Any], metric: str, digits: int = 3) -> str:
    if f"{metric}_mean" not in entry:
        return ""
    mean = f"{entry[f'{metric}_mean']:.{digits}f}"
    if entry.get(f"{metric}_ci95") is None:
        return mean
    low, high = entry[f"{metric}_ci95"]
    return f"{mean} [{low:.{digits}f}, {high:.{digits}f}]"


def format_delta(entry: Mapping[str, Any], metric: str, digits: int = 3) -> str:
    """The paired change vs ``none`` with its mark (:data:`SIGNIFICANCE_RULE`): every table marks changes one way."""
    if f"{metric}_delta_vs_none" not in entry:
        return ""
    star = "*" if entry.get(f"{metric}_delta_significant") else ""
    return f"{entry[f'{metric}_delta_vs_none']:+.{digits}f}{star}"


def markdown_table(summary: Mapping[str, Any]) -> str:
    """One row per (task, method); Δ is the paired change vs ``none``, marked as :data:`SIGNIFICANCE_RULE` says."""
    lexicon = any("lexicon_target_rate_mean" in e for t in summary.values() for e in t.values())
    head = ["task", "method", "n", "suffix score [95% CI]", "Δ"]
    if lexicon:
        head += ["NRC target rate [95% CI]", "Δ", "NRC opposite rate", "Δ"]
    head += ["VADER [95% CI]", "Δ", "perplexity", "distinct-2", "s / prompt", "degenerate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, methods in summary.items():
        for method, e in methods.items():
            name = method + (f" (c={e['coefficient']:g})" if "coefficient" in e else "")
            row = [task, name, str(e["n"]), _fmt(e, "suffix_score", 4), format_delta(e, "suffix_score", 4)]
            if lexicon:
                row += [_fmt(e, "lexicon_target_rate"), format_delta(e, "lexicon_target_rate"),
                        f"{e['lexicon_opposite_rate_mean']:.3f}" if "lexicon_opposite_rate_mean" in e else "",
                        format_delta(e, "lexicon_opposite_rate")]
            row += [_fmt(e, "vader_compound", 2), format_delta(e, "vader_compound", 2),
                    f"{e['perplexity_mean']:.1f}" if "perplexity_mean" in e else "",
                    f"{e['distinct_2_mean']:.2f}" if "distinct_2_mean" in e else "",
                    f"{e['seconds_mean']:.1f}" if "seconds_mean" in e else "", str(e["n_degenerate"])]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_csv(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Flat CSV: one row per (task, method), mean / CI / paired delta / delta CI per metric."""
    columns = ["task", "method", "n", "n_degenerate", "coefficient"]
    for m in METRICS:
        columns += [f"{m}_mean", f"{m}_ci_low", f"{m}_ci_high", f"{m}_delta_vs_none", f"{m}_delta_ci_low",
                    f"{m}_delta_ci_high", f"{m}_delta_significant"]
    path = Path(path)
    fh = io.StringIO(newline="")
    writer = csv.DictWriter(fh, columns)
    writer.writeheader()
    for task, methods in summary.items():
        for method, e in methods.items():
            row: dict[str, Any] = {"task": task, "method": method, "n": e["n"], "n_degenerate": e["n_degenerate"],
                                   "coefficient": e.get("coefficient", "")}
            for m in METRICS:
                if f"{m}_mean" in e:
                    row[f"{m}_mean"] = e[f"{m}_mean"]
                    row[f"{m}_ci_low"], row[f"{m}_ci_high"] = e[f"{m}_ci95"] or ("", "")
                if f"{m}_delta_vs_none" in e:
                    row[f"{m}_delta_vs_none"] = e[f"{m}_delta_vs_none"]
                    row[f"{m}_delta_ci_low"], row[f"{m}_delta_ci_high"] = e[f"{m}_delta_ci95"] or ("", "")
                    row[f"{m}_delta_significant"] = int(bool(e.get(f"{m}_delta_significant")))
            writer.writerow(row)
    return atomic_write(path, fh.getvalue())


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
                mean, (low, high) = e[f"{metric}_mean"], e[f"{metric}_ci95"] or (e[f"{metric}_mean"],) * 2
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
            values = [(e[f"{metric}_ci95"] or [e[f"{metric}_mean"]] * 2)[k] for t in summary.values() for e in t.values()
                      if f"{metric}_mean" in e for k in (0, 1)]
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


def write_summary(out_dir: str | Path, *, repair: bool = False) -> dict[str, Any]:
    """(Re)build summary.json / .csv / .md / .png from the folder's results, for the tasks and methods of its config.

    ``repair``: cut a torn last line of the results (only the folder's writer, which holds its lock, does that).
    """
    out = Path(out_dir)
    if not ((out / RESULTS).is_file() or (out / CONFIG).is_file()):
        raise InputError(f"{out} holds no evaluation ({'no such folder' if not out.is_dir() else f'no {RESULTS}'}); "
                         f"run `python -m workbench evaluate --out {out}` first, or pass the folder of an earlier run")
    config = json.loads((out / CONFIG).read_text()) if (out / CONFIG).is_file() else {}
    records = read_records(out / RESULTS, repair=repair)
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
        "notes": "means with 95% percentile-bootstrap intervals (none for n < 2); *_delta_vs_none: mean paired "
                 "difference (same prompt) to method 'none' with the bootstrap interval of the differences, a paired "
                 "t-test and an exact sign test; " + SIGNIFICANCE_RULE,
        "tasks": per_task,
    }
    if pooled is not None:
        summary["pooled"] = pooled
    atomic_write_json(out / "summary.json", summary)
    write_csv(table, out / "summary.csv")
    atomic_write(out / "summary.md", f"Evaluation on `{summary['model_id']}`. {SIGNIFICANCE_RULE}.\n\n"
                 + markdown_table(table) + "\n")
    if any(per_task.values()):
        plot_summary(per_task, out / "summary.png", summary["model_id"] or "")
    return summary
