"""Norm patterns: where along the layers SelfControl acts, per task, and a heatmap across tasks.

    python -m analyses.norm_patterns [--model M] [--tasks T ...] [--n-prompts 3] [--out DIR]

Runs (or reads from the control cache) SelfControl on the first prompts of
each task's train split, then writes per task ``<task>.png`` (gradient norm,
sensitivity, shift per layer; gradient norm per position), the cross-task
heatmaps ``heatmap_<measure>.png`` and ``heatmap.png`` (sensitivity and
shift side by side), ``norm_patterns.csv`` (one row per task
and layer) and ``norm_patterns.json``.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import workbench as wb
from analyses.common import base_parser, out_dir
from workbench import control_cache, plotting
from workbench.cli.control import add_search_options, search_config
from workbench.norms import EMOTION_TASKS, MEASURES, analyze_norms, norm_heatmap


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__, "norm_patterns")
    parser.add_argument("--tasks", nargs="+", default=EMOTION_TASKS)
    parser.add_argument("--n-prompts", type=int, default=3)
    parser.add_argument("--split", default="train")
    parser.add_argument("--docs-figure", default=None, help="also copy heatmap.png here (README figure)")
    add_search_options(parser)
    parser.set_defaults(max_new_tokens=control_cache.ANALYSIS_DEFAULTS["max_new_tokens"], json=True)
    args = parser.parse_args(argv)
    cfg = search_config(args)
    out = out_dir(args.out)
    start = time.perf_counter()
    model = wb.load_model(args.model, device=args.device, dtype=args.dtype, progress=True)
    patterns, rows = [], []
    for task in args.tasks:
        pattern = analyze_norms(task, model=model, n_prompts=args.n_prompts, split=args.split, config=cfg)
        patterns.append(pattern)
        rows += pattern.rows()
        plotting.save(pattern.plot(), out / f"{task}.png")
        print(f"{task}: mean layer (sensitivity) {pattern.mean_layer('sensitivity'):.1f}, "
              f"gains {[round(g, 4) for g in pattern.gains]}, cached {pattern.from_cache}", flush=True)
    for measure in MEASURES:
        plotting.save(norm_heatmap(patterns, measure), out / f"heatmap_{measure}.png")
    plotting.save(norm_heatmap(patterns, ["sensitivity", "shift"]), out / "heatmap.png")
    write_csv(rows, out / "norm_patterns.csv")
    summary = {"model": model.model_id, "config": control_cache.config_dict(cfg), "tasks": [p.to_dict() for p in patterns],
               "seconds": round(time.perf_counter() - start, 1), "cache": dict(control_cache.stats)}
    (out / "norm_patterns.json").write_text(json.dumps(summary, indent=1))
    if args.docs_figure:
        Path(args.docs_figure).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "heatmap.png", args.docs_figure)
    print(f"wrote {out} in {summary['seconds']} s (cache: {summary['cache']})")


if __name__ == "__main__":
    main()
