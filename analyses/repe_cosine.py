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
import json
import shutil
import time
from pathlib import Path

import workbench as wb
from analyses.common import base_parser, out_dir
from workbench import control_cache, plotting
from workbench.cli.control import add_search_options, search_config
from workbench.directions import gradient_directions
from workbench.norms import EMOTION_TASKS
from workbench.repe import ReadingVector, gradient_cosines, split_pairs
from workbench.tasks import get_task


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__, "repe_cosine")
    parser.add_argument("--tasks", nargs="+", default=EMOTION_TASKS)
    parser.add_argument("--n-prompts", type=int, default=3)
    parser.add_argument("--method", choices=["pca", "mean"], default="pca")
    parser.add_argument("--token", choices=["last", "mean"], default="last")
    parser.add_argument("--docs-figure", default=None, help="also copy the figure here (README figure)")
    add_search_options(parser)
    parser.set_defaults(max_new_tokens=control_cache.ANALYSIS_DEFAULTS["max_new_tokens"], json=True)
    args = parser.parse_args(argv)
    cfg = search_config(args)
    out = out_dir(args.out)
    start = time.perf_counter()
    model = wb.load_model(args.model, device=args.device, dtype=args.dtype, progress=True)
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
    summary = {"model": model.model_id, "method": args.method, "token": args.token, **result.to_dict(),
               "seconds": round(time.perf_counter() - start, 1), "cache": dict(control_cache.stats)}
    (out / "repe_cosine.json").write_text(json.dumps(summary, indent=1))
    if args.docs_figure:
        Path(args.docs_figure).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "repe_cosine.png", args.docs_figure)
    print(f"wrote {out} in {summary['seconds']} s (cache: {summary['cache']})")


if __name__ == "__main__":
    main()
