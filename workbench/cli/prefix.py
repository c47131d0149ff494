"""``synthesize``, ``train-prefix`` and ``export-prefix``: the prefix controller from data to a saved controller and a PEFT adapter (``generate --prefix`` uses it)."""

from __future__ import annotations

import argparse
import json

from . import batch_prompts_option, command, layer_list, load, load_args, ray_options, ray_settings
from .control import add_search_options, search_config


def _synthesize_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="task id (see data/tasks) or a task JSON file")
    parser.add_argument("--split", default="train", help="the task's prompt split to run on (default: train)")
    parser.add_argument("--out", required=True, help="data folder (resumable: a rerun skips finished prompts)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts of the split")
    parser.add_argument("--restart", action="store_true",
                        help="discard the data already in --out and start over (a rerun with other settings is refused "
                             "without it)")
    add_search_options(parser)
    batch_prompts_option(parser)
    ray_options(parser)


@command("synthesize", "run SelfControl on a task's prompts and store controlled hidden states (resumable)", _synthesize_args)
def synthesize_cmd(args: argparse.Namespace) -> int:
    from ..prefix.synthesis import read_index, synthesize
    from ..selfcontrol.tasks import get_task

    config, task = search_config(args), get_task(args.task)
    task.split(args.split)  # refuses an unknown split before the model loads
    ray = ray_settings(args)
    if ray is not None:
        from ..distributed.jobs import synthesize_on_ray

        folder = synthesize_on_ray(load_args(args), task, args.split, args.out, limit=args.limit, config=config,
                                   restart=args.restart, ray=ray, progress=not args.json)
    else:
        folder = synthesize(load(args), task, args.split, args.out, limit=args.limit, config=config,
                            restart=args.restart, batch_size=args.batch_prompts, progress=not args.json)
    entries = read_index(folder)
    gains = [e["gain"] for e in entries]
    summary = {"out": str(folder), "records": len(entries), "improved": sum(g > 0 for g in gains),
               "mean_gain": sum(gains) / len(gains) if gains else None}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['records']} records in {folder}; score improved on {summary['improved']}; "
              f"mean gain {summary['mean_gain']:+.4f}")
    return 0


def _train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="folder written by `synthesize`")
    parser.add_argument("--out", required=True, help="folder to save the controller (safetensors + JSON)")
    parser.add_argument("--n-tokens", type=int, default=2, help="number of virtual tokens (on SmolLM2-135M more tokens disturbed the prompt's states more)")
    parser.add_argument("--layers", type=layer_list, default=None, help="comma-separated layers the loss looks at (default: all)")
    parser.add_argument("--residual-layers", type=layer_list, default=None, help="layers with trainable residual vectors at the prefix ('all', or comma-separated; default none)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shift-fraction", type=float, default=0.5, help="drop records whose hidden states moved more than this fraction of their norm (any layer)")
    parser.add_argument("--keep-no-gain", action="store_true", help="also train on records whose score did not improve")
    parser.add_argument("--init-text", default=None, help="initialise the virtual tokens from this text's tokens")
    parser.add_argument("--loss", choices=["mse", "relative"], default="mse",
                        help="mse (the paper's) or relative (each position's squared error over its squared norm)")


@command("train-prefix", "train a prefix controller on synthesised data and save it", _train_args)
def train_cmd(args: argparse.Namespace) -> int:
    from ..prefix.synthesis import read_manifest
    from ..prefix.training import train_prefix

    read_manifest(args.data)  # a folder with no synthesised data fails before the model loads
    model = load(args)
    residual = None if args.residual_layers == "all" else (args.residual_layers or [])
    controller, report = train_prefix(
        model, args.data, n_tokens=args.n_tokens, layers=None if args.layers == "all" else args.layers,
        residual_layers=residual,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
        val_fraction=args.val_fraction, seed=args.seed, max_shift_fraction=args.max_shift_fraction,
        require_gain=not args.keep_no_gain, init_text=args.init_text, loss=args.loss, progress=not args.json,
    )
    controller.save(args.out)
    if args.json:
        print(json.dumps({"out": args.out, **report.to_dict()}))
    else:
        print(report.summary())
        print(f"saved to {args.out}")
    return 0


def _export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("controller", metavar="CTRL", help="folder written by `train-prefix`")
    parser.add_argument("--peft", required=True, metavar="OUT", help="folder to write the PEFT adapter into")
    parser.add_argument("--method", choices=["prefix-tuning", "prompt-tuning"], default="prefix-tuning",
                        help="prefix-tuning (default): per-layer keys and values, same tokens as the workbench also for "
                             "left-padded batches, residual vectors included; prompt-tuning: the virtual-token embeddings "
                             "(PEFT ignores position ids there, so left-padded rows differ; no residual vectors)")


@command("export-prefix", "write a prefix controller as a PEFT adapter that plain transformers + peft load", _export_args)
def export_cmd(args: argparse.Namespace) -> int:
    from ..prefix.controller import PrefixController
    from ..prefix.export import export_peft

    model = load(args)
    controller = PrefixController.load(args.controller, model)
    out = export_peft(controller, model, args.peft, method=args.method)
    base = model.source or model.model_id
    if args.json:
        print(json.dumps({"out": str(out), "method": args.method, "base_model": base, "n_tokens": controller.n_tokens}))
    else:
        print(f"{args.method} adapter ({controller.n_tokens} virtual tokens) written to {out}; load it with "
              f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {str(out)!r})")
    return 0
