"""Step geometry study (issue 15, item 1): which residual norm should a relative step be a fraction of?

    python -m analyses.step_geometry [--model M] [--tasks T ...] [--n-prompts 14] [--geometries G ...] [--out DIR]

For each emotion task whose judge check is usable (its AUC interval lies above
0.5: verdict "usable" or "weak"; ``--tasks`` overrides), the first
``--n-prompts`` ``test`` prompts and each step geometry
(:mod:`workbench.selfcontrol.steps`), runs SelfControl (controls from the
control cache, so a rerun resumes) and records: suffix-score gain, fluency
(mean NLL and perplexity of the controlled answer, distinct-2, degenerate
answers), accepted iterations, search seconds, the share of the found
control's energy on massive-activation (sink) positions, and what the fluency
guard held back: candidates it refused although they scored above the best
answer so far, and the gain the best-scoring candidate of the whole search
would have given without the guard (an upper bound on what the guard costs). Writes
``step_geometry.csv`` (one row per run), ``step_geometry.json`` (per-geometry
means with paired differences against ``position``), ``step_geometry.md``
(the README table) and ``step_geometry.png`` (gain and sink share per
geometry; control norm per layer on and off the sink).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from analyses.common import Study, base_parser, write_rows
from workbench import plotting
from workbench.analysis import control_cache
from workbench.analysis.norms import EMOTION_TASKS
from workbench.analysis.sinks import plot_control_norms, prompt_sinks
from workbench.evaluation.judge_check import check_task
from workbench.evaluation.judges import bootstrap_ci
from workbench.selfcontrol.fluency import distinct_n, is_degenerate
from workbench.selfcontrol.search import SelfControlConfig, config_dict, resolve_config
from workbench.selfcontrol.steps import GEOMETRIES, sink_energy_share
from workbench.selfcontrol.tasks import get_task

USABLE = ("usable", "weak")


def usable_tasks(model, tasks: Sequence[str]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The tasks whose judge check interval lies above chance, with each task's check."""
    checks = {}
    for t in tasks:
        c = check_task(model, t)
        checks[t] = {"auc": c.auc, "auc_low": c.auc_low, "auc_high": c.auc_high, "verdict": c.verdict}
    return [t for t in tasks if checks[t]["verdict"] in USABLE], checks


def run_searches(model, jobs: list[tuple[str, str, SelfControlConfig]], batch_size: int | None = None
                 ) -> list[control_cache.CachedResult]:
    """Every (task, prompt, config) search, from the cache or batched per (task, config) by ``self_control_many``."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (task, _, cfg) in enumerate(jobs):
        groups.setdefault((task, json.dumps(config_dict(cfg), sort_keys=True)), []).append(i)
    out: list[control_cache.CachedResult | None] = [None] * len(jobs)
    for indices in groups.values():
        task, _, cfg = jobs[indices[0]]
        found = control_cache.cached_self_control_many(model, [jobs[i][1] for i in indices], task, cfg,
                                                       batch_size=batch_size, progress=False)
        for i, record in zip(indices, found, strict=True):
            out[i] = record
    return out  # type: ignore[return-value]


GUARDED = ("disfluent", "degenerate")


def guard_effect(record: control_cache.CachedResult) -> tuple[int, int, float]:
    """(candidates the fluency guard refused, of those how many beat the best score so far, gain without the guard).

    The last is the best score of any candidate of the search minus the initial score: an upper bound, since a
    refused candidate's own later iterations were never run.
    """
    refused = better = 0
    best_seen = record.score
    before = record.initial_score
    for scores_after, candidates in zip(record.iteration_scores, record.candidates, strict=True):
        for c in candidates:
            if c["status"].split(":")[0] in GUARDED:
                refused += 1
                if c["score"] > before:
                    better += 1
                    best_seen = max(best_seen, c["score"])
        before = scores_after
    return refused, better, best_seen - record.initial_score


def _ci(values: Sequence[float]) -> list[float]:
    """95% bootstrap interval of the mean; none (NaN) below two values."""
    return list(bootstrap_ci(list(values))[1:]) if len(values) >= 2 else [float("nan"), float("nan")]


def summarise(rows: list[dict[str, Any]], geometries: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per geometry: means, the paired gain difference against ``position`` with its 95% bootstrap interval."""
    base = {(r["task"], r["prompt"]): r for r in rows if r["geometry"] == "position"}
    out = {}
    for g in geometries:
        mine = [r for r in rows if r["geometry"] == g]
        if not mine:
            continue
        gains = np.array([r["gain"] for r in mine])
        entry = {
            "n": len(mine), "gain": float(gains.mean()), "gain_ci": _ci(gains.tolist()),
            "nll": float(np.mean([r["nll"] for r in mine])),
            "perplexity": float(np.mean([math.exp(r["nll"]) for r in mine])),
            "distinct2": float(np.mean([r["distinct2"] for r in mine])),
            "degenerate": int(sum(r["degenerate"] for r in mine)),
            "accepted": float(np.mean([r["accepted"] for r in mine])),
            "seconds": float(np.mean([r["seconds"] for r in mine])),
            # over the runs that found a control (a run that accepted nothing has no energy to share)
            "sink_share": float(np.mean([r["sink_share"] for r in mine if r["accepted"]] or [float("nan")])),
            "improved": int(sum(r["gain"] > 0 for r in mine)),
            "guard_refused": int(sum(r["guard_refused"] for r in mine)),
            "guard_refused_better": int(sum(r["guard_refused_better"] for r in mine)),
            "candidates": int(sum(r["candidates"] for r in mine)),
            "gain_unguarded": float(np.mean([r["gain_unguarded"] for r in mine])),
        }
        paired = [r["gain"] - base[(r["task"], r["prompt"])]["gain"] for r in mine if (r["task"], r["prompt"]) in base]
        if g != "position" and paired:
            entry["delta_vs_position"] = float(np.mean(paired))
            entry["delta_ci"] = _ci(paired)
            entry["wins"] = int(sum(d > 0 for d in paired))
            entry["losses"] = int(sum(d < 0 for d in paired))
        out[g] = entry
    return out


def table(summary: dict[str, dict[str, Any]]) -> str:
    def ci(values) -> str:
        low, high = values
        return "" if any(v != v for v in (low, high)) else f" [{low:+.4f}, {high:+.4f}]"

    lines = ["| geometry | runs | gain [95% CI] | Δ gain vs position [95% CI] (wins/losses) | prompts improved | "
             "mean NLL | perplexity | distinct-2 | degenerate | accepted iterations | s / prompt | energy on sink (runs with a control) | "
             "candidates refused by the guard (of them scoring higher) | gain without the guard (upper bound) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for g, s in summary.items():
        delta = (f"{s['delta_vs_position']:+.4f}{ci(s['delta_ci'])} ({s['wins']}/{s['losses']})"
                 if "delta_vs_position" in s else "")
        lines.append(f"| {g} | {s['n']} | {s['gain']:+.4f}{ci(s['gain_ci'])} | {delta} | {s['improved']} | {s['nll']:.3f} | "
                     f"{s['perplexity']:.2f} | {s['distinct2']:.2f} | {s['degenerate']} | {s['accepted']:.2f} | "
                     f"{s['seconds']:.1f} | {s['sink_share']:.1%} | {s['guard_refused']} of {s['candidates']} "
                     f"({s['guard_refused_better']}) | {s['gain_unguarded']:+.4f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], summary: dict[str, dict[str, Any]], examples: dict[str, Any], sinks, model_id: str):
    fig, axes = plotting.figure(1, 3, width=4.4, height=3.4)
    names = list(summary)
    ax = axes[0, 0]
    for i, g in enumerate(names):
        gains = [r["gain"] for r in rows if r["geometry"] == g]
        ax.scatter(np.full(len(gains), i) + np.linspace(-0.15, 0.15, len(gains)), gains, s=10, alpha=0.6)
        mean, (low, high) = summary[g]["gain"], summary[g]["gain_ci"]
        ax.errorbar(i, mean, yerr=[[mean - low], [high - mean]] if low == low else None, fmt="D", color="black", ms=5)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax.set_xlabel("step geometry")
    ax.set_ylabel("suffix-score gain (each run; mean, 95% CI)")
    ax = axes[0, 1]
    ax.bar(range(len(names)), [np.nan_to_num(summary[g]["sink_share"]) for g in names], color="tab:purple")
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax.set_xlabel("step geometry")
    ax.set_ylabel("control energy on the sink (runs with a control)")
    ax.set_ylim(0, 1)
    ax = axes[0, 2]
    for g, control in examples.items():
        plot_control_norms(ax, control, sinks, label=g)
    ax.set_title("one prompt's control, sink apart", fontsize=8)
    fig.suptitle(f"Step geometry — {plotting.model_label(model_id)} ({len(rows)} searches)", fontsize=10)
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__, "step_geometry")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="task ids (default: the emotion tasks whose judge check is usable or weak)")
    parser.add_argument("--n-prompts", type=int, default=14, help="first N test prompts per task")
    parser.add_argument("--geometries", nargs="+", default=list(GEOMETRIES), choices=GEOMETRIES)
    study = Study.from_parser(parser, argv)
    args, cfg, out, model = study.args, study.config, study.out, study.model
    if args.tasks:
        tasks, checks = list(args.tasks), {}
    else:
        tasks, checks = usable_tasks(model, EMOTION_TASKS)
        print(f"judge check: {checks}; studying {tasks}", flush=True)
    geometries = ["position", *[g for g in args.geometries if g != "position"]]
    jobs = [(t, p, resolve_config(cfg, step_geometry=g)) for t in tasks for p in get_task(t).split("test")[: args.n_prompts]
            for g in geometries]
    records = run_searches(model, jobs, args.batch_prompts)
    rows, sink_cache, examples = [], {}, {}
    for (task, prompt, job_cfg), record in zip(jobs, records, strict=True):
        key = tuple(record.prompt_ids)
        if key not in sink_cache:
            sink_cache[key] = prompt_sinks(model, record.prompt_ids, record.hook_names, job_cfg.sink_ratio)
        sinks = sink_cache[key]
        examples.setdefault(key, {})[job_cfg.step_geometry] = (record.control, sinks, sum(s is not None for s in record.accepted_steps))
        rows.append({
            "task": task, "prompt": prompt, "geometry": job_cfg.step_geometry,
            "initial_score": record.initial_score, "score": record.score, "gain": record.gain,
            "nll": record.nll, "original_nll": record.original_nll,
            "distinct2": distinct_n(record.response_ids, 2) if len(record.response_ids) > 1 else 0.0,
            "degenerate": bool(is_degenerate(record.response_ids)),
            "accepted": sum(s is not None for s in record.accepted_steps), "seconds": record.seconds,
            "sink_share": sink_energy_share(record.control.deltas, sinks),
            "sink_positions": int(sinks.any(0).sum()), "from_cache": record.from_cache,
            "response": record.response,
            "candidates": sum(c["status"] != "not evaluated" for it in record.candidates for c in it),
            **dict(zip(("guard_refused", "guard_refused_better", "gain_unguarded"), guard_effect(record), strict=True)),
        })
    summary = summarise(rows, geometries)
    write_rows(rows, out / "step_geometry.csv")
    md = table(summary)
    (out / "step_geometry.md").write_text(md + "\n")
    print(md, flush=True)
    # the control-norm panel shows the first prompt on which every geometry found a control (else the first prompt)
    shown = next((e for e in examples.values() if all(a for _, _, a in e.values())), next(iter(examples.values())))
    plotting.save(plot(rows, summary, {g: c for g, (c, _, _) in shown.items()}, next(iter(shown.values()))[1],
                       model.model_id), out / "step_geometry.png")
    study.finish("step_geometry", {"tasks": tasks, "judge_check": checks, "n_prompts": args.n_prompts,
                                   "summary": summary, "rows": rows}, figure="step_geometry.png")


if __name__ == "__main__":
    main()


def dtype_check(model_name: str = "tiny-random", etas: Sequence[float] = (-0.001, -0.002, -0.004, -(2.0**-7), -0.016)) -> dict[float, float]:
    """Issue 11.5's measure in bfloat16: cosine of the applied with the intended delta per relative step (one layer).

        python -c "from analyses.step_geometry import dtype_check; print(dtype_check())"
    """
    import torch

    import workbench as wb
    from workbench.selfcontrol.steps import applied_cosine
    from workbench.selfcontrol.suffix import suffix_gradients
    from workbench.selfcontrol.tasks import Task

    model = wb.load_model(model_name, dtype=torch.bfloat16, progress=False)
    prompt = model.chat_ids("Tell me what you think of rude drivers.")
    grads = suffix_gradients(model, prompt, model.encode("They annoy me a lot."), Task(question="Was your answer calm?"),
                             layers=[1], clip=None)
    return {eta: round(applied_cosine(model, grads.step(eta, "relative"), prompt, model.hook_name(1)), 3) for eta in etas}
