"""``evaluate`` and ``judge-check``: compare control methods; check the self-judge per task."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import InputError
from . import (
    batch_prompts_option,
    command,
    layer_list,
    load,
    load_args,
    number_list,
    ray_options,
    ray_settings,
)
from .control import add_search_options, search_config


def _tasks(text: str) -> list[str]:
    """Comma-separated task ids; ``emotion`` = the tasks with an NRC lexicon, ``all`` = every shipped task."""
    from ..selfcontrol.tasks import get_task, list_tasks

    out: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if item == "all":
            out += list_tasks()
        elif item == "emotion":
            out += [t for t in list_tasks() if get_task(t).lexicon]
        elif item:
            out.append(item)
    return list(dict.fromkeys(out))


def _evaluate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default="emotion", help="comma-separated task ids, 'emotion' or 'all' (default: emotion)")
    parser.add_argument("--methods", default="none,prompt,repe,selfcontrol",
                        help="comma-separated among none,prompt,repe,selfcontrol,prefix")
    parser.add_argument("--prompts", default="test", help="a split name (test) or a JSON file: a list, or {task id: list}")
    parser.add_argument("--out", default="results/evaluation", help="output folder; a rerun into it resumes")
    parser.add_argument("--prefix", default=None, help="trained prefix controller folder (or one sub-folder per task id)")
    parser.add_argument("--limit", type=int, default=None, help="at most N prompts per task")
    parser.add_argument("--prompt-style", choices=["user", "system"], default="user",
                        help="where the 'prompt' method puts the task's instruction")
    parser.add_argument("--repe-layers", type=layer_list, default=None, help="layers for reading-vector addition (default: middle third)")
    parser.add_argument("--repe-coefficients", type=number_list, default="0,0.025,0.05,0.1,0.2",
                        help="coefficients (x mean residual norm) to choose from on train prompts")
    parser.add_argument("--repe-select", type=int, default=6, help="train prompts the repe coefficient is chosen on")
    parser.add_argument("--repe-pairs", type=int, default=None, help="contrast pairs the reading vector is fitted on (default: all)")
    parser.add_argument("--config", default=None, help="rerun/resume the run described by an earlier config.json")
    parser.add_argument("--summary-only", action="store_true", help="only rebuild the summary of --out from its results")
    parser.add_argument("--restart", action="store_true",
                        help="discard the results already in --out and start over (a rerun with other settings is "
                             "refused without it)")
    add_search_options(parser)  # selfcontrol's knobs; --max-new-tokens, --seed and --sample apply to every method
    batch_prompts_option(parser)
    ray_options(parser)


@command("evaluate", "compare control methods on held-out prompts with the clean self-judge and independent judges", _evaluate_args)
def evaluate_command(args: argparse.Namespace) -> int:
    from ..evaluation.methods import build_methods
    from ..evaluation.report import write_summary
    from ..evaluation.runner import evaluate, evaluate_from_config, resolve_prompts
    from ..selfcontrol.tasks import get_task

    if args.summary_only:
        summary = write_summary(args.out)
        print(json.dumps(summary) if args.json else (Path(args.out) / "summary.md").read_text())
        return 0
    ray = ray_settings(args)
    if args.config and ray is not None:
        raise InputError("--ray runs the settings given on the command line; to resume a run on Ray, repeat its "
                         "command with --ray (the folder's fingerprint checks that the settings are the same)")
    if args.config:
        result = evaluate_from_config(args.config, model=load(args) if args.model else None, progress=not args.json,
                                      restart=args.restart)
    else:
        cfg = search_config(args)
        repe = {"coefficients": args.repe_coefficients, "n_select": args.repe_select, "n_pairs": args.repe_pairs,
                "layers": args.repe_layers if isinstance(args.repe_layers, list) else None}
        tasks = _tasks(args.tasks)
        # bad tasks, methods or prompts fail here, before the model loads
        build_methods(args.methods, prefix=args.prefix, selfcontrol=cfg, repe=repe, prompt_style=args.prompt_style,
                      batch_prompts=args.batch_prompts)
        resolve_prompts([get_task(t) for t in tasks], args.prompts, args.limit)
        settings = dict(prefix=args.prefix, max_new_tokens=args.max_new_tokens, seed=args.seed, do_sample=args.sample,
                        limit=args.limit, selfcontrol=cfg, repe=repe, prompt_style=args.prompt_style,
                        batch_prompts=args.batch_prompts, restart=args.restart, progress=not args.json)
        if ray is not None:
            from ..distributed.jobs import evaluate_on_ray

            result = evaluate_on_ray(load_args(args), tasks, args.methods, args.prompts, args.out, ray=ray, **settings)
        else:
            result = evaluate(load(args), tasks, args.methods, args.prompts, args.out, **settings)
    if args.json:
        print(json.dumps(result.summary))
    else:
        print(result.table)
        print(f"written to {result.out_dir}")
    return 0


def _judge_check_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="all", help="a task id, a comma-separated list, 'emotion' or 'all' (default)")
    parser.add_argument("--out", default="results/judge_check", help="folder for judge_check.{json,md,png}")
    parser.add_argument("--paraphrases", action="store_true", help="average the score over the task's paraphrased questions")
    parser.add_argument("--select", action="store_true",
                        help="choose each task's judge wording (question x answer format) on half of the pairs, report "
                             "it on the other half, and save the choice for --question auto")


@command("judge-check", "how well the model's suffix score separates each task's contrast pairs (ROC AUC)", _judge_check_args)
def judge_check_command(args: argparse.Namespace) -> int:
    from ..evaluation.judge_check import judge_check, select_wordings
    from ..selfcontrol.tasks import get_task

    tasks = _tasks(args.task)
    for t in tasks:  # bad task ids fail before the model loads
        get_task(t)
    if args.select:
        result = select_wordings(load(args), tasks, progress=not args.json)
        saved = "; choices saved for --question auto"
    else:
        result = judge_check(load(args), tasks, paraphrases=args.paraphrases, progress=not args.json)
        saved = ""
    paths = result.save(args.out)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(result.table())
        print(f"written to {paths['markdown'].parent}{saved}")
    return 0
