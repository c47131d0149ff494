"""Layer-window ablation: keep a found control only on a window of layers and score the result.

    python -m analyses.layer_ablation [--model M] [--tasks T ...] [--n-prompts 2] [--widths 5 10 15] [--out DIR]

For each task and prompt (first prompts of the train split; controls from
the control cache), regenerates the answer with the control restricted to
each window and scores it with the clean suffix score. Writes
``<task>.png`` (gain over no control per window width × start, and against
window centre), ``layer_ablation.csv`` and ``layer_ablation.json``.
"""

from __future__ import annotations

from analyses.common import Study, base_parser, write_rows
from workbench import plotting
from workbench.analysis import control_cache
from workbench.analysis.ablation import layer_window_ablation, plot_layer_ablation
from workbench.selfcontrol.tasks import get_task


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__, "layer_ablation")
    parser.add_argument("--tasks", nargs="+", default=["angry2peaceful"])
    parser.add_argument("--n-prompts", type=int, default=2)
    parser.add_argument("--widths", type=int, nargs="+", default=None, help="window widths (default: n/6, n/3, n/2)")
    parser.add_argument("--stride", type=int, default=None, help="window stride in layers (default: n/10)")
    study = Study.from_parser(parser, argv)
    args, cfg, out, model = study.args, study.config, study.out, study.model
    results, rows = [], []
    for task in args.tasks:
        per_task = []
        records = control_cache.cached_self_control_many(model, get_task(task).split("train")[: args.n_prompts], task, cfg,
                                                         batch_size=args.batch_prompts)
        for record in records:
            ablation = layer_window_ablation(model, record, task, widths=args.widths, stride=args.stride)
            per_task.append(ablation)
            rows += ablation.rows()
            print(f"{task}: search {record.initial_score:.4f} -> {record.score:.4f}; regenerated: none "
                  f"{ablation.none_score:.4f}, full {ablation.full_score:.4f}, best window "
                  f"{max(ablation.scores):.4f}", flush=True)
        plotting.save(plot_layer_ablation(per_task), out / f"{task}.png")
        results += per_task
    write_rows(rows, out / "layer_ablation.csv")
    study.finish("layer_ablation", {"ablations": [a.to_dict() for a in results]}, figure=f"{args.tasks[0]}.png")


if __name__ == "__main__":
    main()
