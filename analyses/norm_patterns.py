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

from analyses.common import Study, base_parser, write_rows
from workbench import plotting
from workbench.analysis.norms import EMOTION_TASKS, MEASURES, analyze_norms, norm_heatmap
from workbench.selfcontrol.search import config_dict


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__, "norm_patterns")
    parser.add_argument("--tasks", nargs="+", default=EMOTION_TASKS)
    parser.add_argument("--n-prompts", type=int, default=3)
    parser.add_argument("--split", default="train")
    study = Study.from_parser(parser, argv)
    args, cfg, out, model = study.args, study.config, study.out, study.model
    patterns, rows = [], []
    for task in args.tasks:
        pattern = analyze_norms(task, model=model, n_prompts=args.n_prompts, split=args.split, config=cfg,
                                batch_prompts=args.batch_prompts)
        patterns.append(pattern)
        rows += pattern.rows()
        plotting.save(pattern.plot(), out / f"{task}.png")
        print(f"{task}: mean layer (sensitivity) {pattern.mean_layer('sensitivity'):.1f}, "
              f"gains {[round(g, 4) for g in pattern.gains]}, cached {pattern.from_cache}", flush=True)
    for measure in MEASURES:
        plotting.save(norm_heatmap(patterns, measure), out / f"heatmap_{measure}.png")
    plotting.save(norm_heatmap(patterns, ["sensitivity", "shift"]), out / "heatmap.png")
    write_rows(rows, out / "norm_patterns.csv")
    study.finish("norm_patterns", {"config": config_dict(cfg), "tasks": [p.to_dict() for p in patterns]},
                 figure="heatmap.png")


if __name__ == "__main__":
    main()
