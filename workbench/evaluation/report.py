"""Summaries of an evaluation: statistics per task and method, Markdown, CSV and a figure.

Why apart from the runner: a summary is rebuilt from ``results.jsonl`` alone
(``evaluate --summary-only``), and its statistics decide what a table claims,
so they live in one place that the runner, the CLI and the studies share.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import plotting
from ..errors import InputError
from .judges import bootstrap_ci

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


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)



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
    if not ((out / RESULTS).is_file() or (out / CONFIG).is_file()):
        raise InputError(f"{out} holds no evaluation ({'no such folder' if not out.is_dir() else f'no {RESULTS}'}); "
                         f"run `python -m workbench evaluate --out {out}` first, or pass the folder of an earlier run")
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
    write_json(out / "summary.json", summary)
    write_csv(table, out / "summary.csv")
    (out / "summary.md").write_text(
        f"Evaluation on `{summary['model_id']}` (Δ: paired change vs `none`; * = 95% bootstrap interval excludes 0)\n\n"
        + markdown_table(table) + "\n")
    if any(per_task.values()):
        plot_summary(per_task, out / "summary.png", summary["model_id"] or "")
    return summary
