"""``control`` and ``demo``: SelfControl on one prompt."""

from __future__ import annotations

import argparse
import json

from . import command, layer_list, load


def add_search_options(parser: argparse.ArgumentParser) -> None:
    """Every knob of :class:`workbench.selfcontrol.search.SelfControlConfig` as a flag."""
    g = parser.add_argument_group("search")
    g.add_argument("--iterations", type=int, default=3)
    g.add_argument("--initial-step", type=float, default=None,
                   help="eta0 < 0 (h <- h + eta*grad(loss), so a negative step descends the loss); default -0.001 relative, -0.5 absolute")
    g.add_argument("--step-scale", type=float, default=2.0)
    g.add_argument("--n-steps", type=int, default=4)
    g.add_argument("--step-mode", choices=["relative", "absolute"], default="relative")
    g.add_argument("--step-geometry", choices=["position", "layer-median", "sink-median", "sink-off"], default="position",
                   help="which residual norm a relative step is a fraction of: each position's own, the layer's median, "
                        "the median at massive-activation (sink) positions only, or no step at sinks")
    g.add_argument("--sink-ratio", type=float, default=12.0,
                   help="a position whose residual norm exceeds this many times the layer's median is a sink")
    g.add_argument("--threshold", type=float, default=0.0)
    g.add_argument("--branches", type=int, default=1)
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--loss", choices=["score", "ce"], default="score")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--layers", type=layer_list, default=None, help="comma-separated layers to control (default: all)")
    g.add_argument("--point", default="hook_resid_post", help="hook point per block")
    g.add_argument("--paraphrases", action="store_true", help="average the score over the task's paraphrased questions")
    g.add_argument("--question", default=None,
                   help="the self-judge's question: 'auto' = the wording judge-check --select chose for this model, "
                        "or a question text (default: the task's own)")
    g.add_argument("--no-fluency-guard", action="store_true")


def search_config(args: argparse.Namespace):
    """The search settings of the flags, validated: build it before loading the model, so bad flags fail fast."""
    from ..selfcontrol.search import SelfControlConfig

    return SelfControlConfig(
        iterations=args.iterations, initial_step=args.initial_step, step_scale=args.step_scale, n_steps=args.n_steps,
        step_mode=args.step_mode, step_geometry=args.step_geometry, sink_ratio=args.sink_ratio,
        threshold=args.threshold, branches=args.branches, max_new_tokens=args.max_new_tokens,
        loss=args.loss, do_sample=args.sample, seed=args.seed, point=args.point,
        layers=tuple(args.layers) if isinstance(args.layers, list) else None,
        paraphrases=args.paraphrases, question=args.question, fluency_guard=not args.no_fluency_guard, progress=not args.json,
    )


def _control_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="task id (see data/tasks) or a task JSON file")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--save", default=None, help="folder to save the found control (safetensors + JSON)")
    parser.add_argument("--trajectory", action="store_true", help="include the whole trajectory in --json output")
    add_search_options(parser)


def _print_result(result) -> None:
    print(f"task:   {result.task_id}\nprompt: {result.prompt}\n")
    print(f"original   (score {result.initial_score:.4f}):\n  {result.original_response}\n")
    print(f"controlled (score {result.score:.4f}, {result.iterations_accepted} accepted iteration(s)):\n  {result.response}\n")
    for it in result.iterations:
        steps = ", ".join(f"{c.step:+.4g}: {c.score:.4f} {c.status.split(':')[0]}" for c in it.candidates)
        print(f"  iteration {it.index}: {steps}")
    print(f"\n{result.seconds:.1f} s")


@command("control", "run SelfControl on one prompt and print before/after with scores", _control_args)
def control(args: argparse.Namespace) -> int:
    from ..selfcontrol.search import self_control
    from ..selfcontrol.tasks import get_task

    config, task = search_config(args), get_task(args.task)
    model = load(args)
    result = self_control(model, args.prompt, task, config)
    if args.save:
        result.control.save(args.save)
    if args.json:
        print(json.dumps(result.to_dict(trajectory=args.trajectory)))
    else:
        _print_result(result)
    return 0


def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="angry2peaceful")
    parser.add_argument("--prompt", default=None, help="default: the task's first train prompt")
    add_search_options(parser)


@command("demo", "the main demo: SelfControl on the embedded model for one prompt", _demo_args)
def demo(args: argparse.Namespace) -> int:
    from ..selfcontrol.search import self_control
    from ..selfcontrol.tasks import get_task

    config, task = search_config(args), get_task(args.task)
    prompt = args.prompt or task.split("train")[0]
    model = load(args)
    print(f"{model}\nbehaviour: {task.description}\nquestion:  {task.question}\n")
    _print_result(self_control(model, prompt, task, config))
    return 0
