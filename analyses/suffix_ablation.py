"""Suffix ablation: does the wording of the self-judgement question matter?

    python -m analyses.suffix_ablation [--model M] [--tasks T ...] [--n-prompts 2] [--out DIR]

For each task, its question and paraphrases each define a suffix. Per
prompt: cosine between their first-iteration steering directions per layer,
and a SelfControl run with each wording (cached): the score reached under its
own wording and under the main question. Writes ``<task>.png``,
``suffix_ablation.csv`` and ``suffix_ablation.json``.
"""

from __future__ import annotations

import csv
import json
import time

import numpy as np

import workbench as wb
from analyses.common import base_parser, out_dir
from workbench import control_cache, plotting
from workbench.ablation import suffix_ablation
from workbench.cli.control import add_search_options, search_config


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__, "suffix_ablation")
    parser.add_argument("--tasks", nargs="+", default=["angry2peaceful"])
    parser.add_argument("--n-prompts", type=int, default=2)
    add_search_options(parser)
    parser.set_defaults(max_new_tokens=control_cache.ANALYSIS_DEFAULTS["max_new_tokens"], json=True)
    args = parser.parse_args(argv)
    cfg = search_config(args)
    out = out_dir(args.out)
    start = time.perf_counter()
    model = wb.load_model(args.model, device=args.device, dtype=args.dtype, progress=True)
    results, rows = [], []
    for task in args.tasks:
        ablation = suffix_ablation(model, task, n_prompts=args.n_prompts, config=cfg)
        results.append(ablation)
        rows += ablation.rows()
        plotting.save(ablation.plot(), out / f"{task}.png")
        gains = (ablation.final_scores - ablation.initial_scores).mean(0)
        print(f"{task}: mean cosine between wordings {np.nanmean(ablation.layer_profile()):.3f}; "
              f"gain per wording {[round(float(g), 4) for g in gains]}", flush=True)
    with (out / "suffix_ablation.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {"model": model.model_id, "ablations": [a.to_dict() for a in results],
               "seconds": round(time.perf_counter() - start, 1), "cache": dict(control_cache.stats)}
    (out / "suffix_ablation.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out} in {summary['seconds']} s (cache: {summary['cache']})")


if __name__ == "__main__":
    main()
