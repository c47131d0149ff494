"""RepE reading vectors vs suffix-gradient directions, per layer, same task and across tasks.

    python -m analyses.repe_cosine [--model M] [--tasks T ...] [--n-prompts 3] [--method pca|mean] [--out DIR]

Fits a reading vector per task on two thirds of its contrast pairs,
measures its accuracy on the held-out third, takes the first-iteration
steering directions of the first prompts of each task (responses from the
control cache when present) and writes ``repe_cosine.png`` (same-task cosine
per layer with the random-direction band, task × task matrix over the middle
layers, held-out accuracy), ``repe_cosine.csv``, ``repe_cosine.json`` and
the reading vectors under ``reading_vectors/<task>/``.
"""

from __future__ import annotations

import csv

from analyses.common import Study, base_parser
from workbench import plotting
from workbench.analysis.directions import gradient_directions
from workbench.analysis.norms import EMOTION_TASKS
from workbench.analysis.repe import ReadingVector, gradient_cosines, split_pairs
from workbench.selfcontrol.tasks import get_task


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__, "repe_cosine")
    parser.add_argument("--tasks", nargs="+", default=EMOTION_TASKS)
    parser.add_argument("--n-prompts", type=int, default=3)
    parser.add_argument("--method", choices=["pca", "mean"], default="pca")
    parser.add_argument("--token", choices=["last", "mean"], default="last")
    study = Study.from_parser(parser, argv)
    args, cfg, out, model = study.args, study.config, study.out, study.model
    vectors, accuracy = {}, {}
    for task in args.tasks:
        fit, held_out = split_pairs(get_task(task).contrast_pairs)
        rv = ReadingVector.fit(model, task, pairs=fit, point=cfg.point, method=args.method, token=args.token, progress=True)
        vectors[task] = rv
        accuracy[task] = rv.accuracy(model, held_out)
        rv.save(out / "reading_vectors" / task)
        best = max(accuracy[task], key=accuracy[task].get)
        print(f"{task}: {len(fit)} fit / {len(held_out)} held-out pairs, best held-out accuracy "
              f"{accuracy[task][best]:.2f} at layer {best}", flush=True)
    dirs = gradient_directions(model, args.tasks, n_prompts=args.n_prompts, config=cfg)
    result = gradient_cosines(vectors, dirs, accuracy)
    plotting.save(result.plot(), out / "repe_cosine.png")
    same = result.same_task()
    cross = result.cross_task()
    with (out / "repe_cosine.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "task", "layer", "same_task_cosine", "cross_task_mean_cosine", "held_out_accuracy"])
        for task, values in same.items():
            for i, layer in enumerate(result.layers):
                writer.writerow([model.model_id, task, layer, float(values[i]), float(cross[i]), accuracy[task].get(layer)])
    study.finish("repe_cosine", {"method": args.method, "token": args.token, **result.to_dict()}, figure="repe_cosine.png")


if __name__ == "__main__":
    main()
