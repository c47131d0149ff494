"""Directions of suffix gradients: PCA across tasks and prompts, agreement per layer, trajectories.

    python -m analyses.directions [--model M] [--tasks T ...] [--n-prompts 3] [--out DIR]

Writes ``pca_by_layer.png`` (first two principal components of the
steering directions at several layers, coloured by task),
``consistency.png`` (mean cosine between prompts of the same / different
tasks per layer), ``task_cosines.png`` (tasks' mean directions at a middle
layer), ``trajectories.png`` (PCA of the control across iterations, for the
prompt with the most accepted iterations of each of the first tasks), ``directions.csv`` and ``directions.json``.
Responses and trajectories come from the control cache (run
``analyses.norm_patterns`` first with the same settings to share it).
"""

from __future__ import annotations

import csv

from analyses.common import Study, base_parser
from workbench import plotting
from workbench.analysis import control_cache
from workbench.analysis.directions import (
    gradient_directions,
    plot_consistency,
    plot_cosine_matrix,
    plot_direction_pca,
    plot_trajectories,
    task_cosines,
    trajectory_pca,
)
from workbench.analysis.norms import EMOTION_TASKS
from workbench.selfcontrol.tasks import get_task


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__, "directions")
    parser.add_argument("--tasks", nargs="+", default=EMOTION_TASKS)
    parser.add_argument("--n-prompts", type=int, default=3)
    parser.add_argument("--position", choices=["last", "mean"], default="last")
    parser.add_argument("--trajectories", type=int, default=3, help="how many tasks get a trajectory panel")
    study = Study.from_parser(parser, argv)
    args, cfg, out, model = study.args, study.config, study.out, study.model
    dirs = gradient_directions(model, args.tasks, n_prompts=args.n_prompts, position=args.position, config=cfg,
                               batch_prompts=args.batch_prompts)
    plotting.save(plot_direction_pca(dirs), out / "pca_by_layer.png")
    plotting.save(plot_consistency(dirs), out / "consistency.png")
    middle = dirs.layers[len(dirs.layers) // 2]
    fig = plot_cosine_matrix(task_cosines(dirs, middle), dirs.task_ids(),
                             title=f"tasks' mean steering directions, layer {middle}\n{plotting.model_label(model.model_id)}")
    plotting.save(fig, out / "task_cosines.png")
    trajectories = []
    for task in args.tasks[: args.trajectories]:
        # the run with the most accepted iterations among the task's first prompts: the longest path
        records = control_cache.cached_self_control_many(model, get_task(task).split("train")[: args.n_prompts], task, cfg,
                                                         batch_size=args.batch_prompts)
        record = max(records, key=lambda r: sum(s is not None for s in r.accepted_steps))
        trajectories.append(trajectory_pca(model, record))
    plotting.save(plot_trajectories(trajectories), out / "trajectories.png")
    consistency = dirs.consistency()
    with (out / "directions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "task", "layer", "same_task_cosine"])
        for task, values in consistency.items():
            writer.writerows([model.model_id, task, layer, float(v)] for layer, v in zip(dirs.layers, values, strict=True))
    study.finish("directions", {"directions": dirs.to_dict(), "task_cosines_layer": middle,
                                "task_cosines": task_cosines(dirs, middle).tolist(),
                                "trajectories": [t.to_dict() for t in trajectories]}, figure="pca_by_layer.png")


if __name__ == "__main__":
    main()
