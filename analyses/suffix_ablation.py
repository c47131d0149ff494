"""Suffix ablation: does the wording of the self-judgement question matter?

    python -m analyses.suffix_ablation [--model M] [--tasks T ...] [--n-prompts 2] [--out DIR]

For each task, its question and paraphrases each define a suffix. Per
prompt: cosine between their first-iteration steering directions per layer,
and a SelfControl run with each wording (cached): the score reached under its
own wording and under the main question. Writes ``<task>.png``,
``suffix_ablation.csv`` and ``suffix_ablation.json``.
"""

from __future__ import annotations

import numpy as np

from analyses.common import Study, base_parser, write_rows
from workbench import plotting
from workbench.analysis.ablation import suffix_ablation


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__, "suffix_ablation")
    parser.add_argument("--tasks", nargs="+", default=["angry2peaceful"])
    parser.add_argument("--n-prompts", type=int, default=2)
    study = Study.from_parser(parser, argv)
    args, cfg, out, model = study.args, study.config, study.out, study.model
    results, rows = [], []
    for task in args.tasks:
        ablation = suffix_ablation(model, task, n_prompts=args.n_prompts, config=cfg, batch_prompts=args.batch_prompts)
        results.append(ablation)
        rows += ablation.rows()
        plotting.save(ablation.plot(), out / f"{task}.png")
        gains = (ablation.final_scores - ablation.initial_scores).mean(0)
        print(f"{task}: mean cosine between wordings {np.nanmean(ablation.layer_profile()):.3f}; "
              f"gain per wording {[round(float(g), 4) for g in gains]}", flush=True)
    write_rows(rows, out / "suffix_ablation.csv")
    study.finish("suffix_ablation", {"ablations": [a.to_dict() for a in results]}, figure=f"{args.tasks[0]}.png")


if __name__ == "__main__":
    main()
