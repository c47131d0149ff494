"""``preference-data`` makes preference pairs (SelfControl's or instructed answers over the plain ones);
``dpo`` trains a model on them with TRL's DPOTrainer, the result loading with ``--model MODEL_DIR``."""

from __future__ import annotations

import argparse
import json
import sys

from . import command, load
from .control import add_search_options, search_config


def _dpo_args(parser: argparse.ArgumentParser) -> None:
    from ..preference.dpo import DPOSettings

    defaults = DPOSettings()
    parser.add_argument("--data", required=True, help="folder holding pairs.jsonl (TRL's conversational preference format) or a .jsonl file")
    parser.add_argument("--out", required=True, help="folder for the trained model (config, safetensors, tokenizer, dpo.json)")
    parser.add_argument("--epochs", type=float, default=defaults.epochs)
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"learning rate (default {defaults.lr:g}; LoRA wants more, e.g. 1e-4)")
    parser.add_argument("--beta", type=float, default=defaults.beta, help="DPO's beta: how far from the base model the policy may move")
    parser.add_argument("--lora", type=int, default=None, metavar="R", help="train a rank-R LoRA on every linear layer and merge it (default: full fine-tuning)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 * R)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help="truncate prompt + answer to this many tokens")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


@command("dpo", "train the model by DPO on preference pairs and save it as a plain model folder", _dpo_args)
def dpo_cmd(args: argparse.Namespace) -> int:
    from ..preference.dpo import train_dpo

    if args.dtype not in (None, "float32", "fp32"):
        print("note: DPO trains in float32; --dtype is ignored", file=sys.stderr)
    report = train_dpo(args.data, args.out, model=args.model, device=args.device, overwrite=args.overwrite,
                       progress=not args.json, epochs=args.epochs, lr=args.lr, beta=args.beta, lora_rank=args.lora,
                       lora_alpha=args.lora_alpha, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(report.summary())
        print(f"load it with: python -m workbench chat --model {report.out_dir} --prompt ...")
    return 0


def _data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="task id (see data/tasks) or a task JSON file")
    parser.add_argument("--split", default="train", help="the task's prompt split to run on (default: train)")
    parser.add_argument("--out", required=True, help="data folder (resumable: a rerun skips finished prompts)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts of the split")
    parser.add_argument("--min-gain", type=float, default=0.0,
                        help="keep a pair when chosen's suffix score beats rejected's by at least this (and by more than 0)")
    parser.add_argument("--baseline", choices=["prompt"], default=None,
                        help="instead of SelfControl, chosen = the answer when the behaviour is asked for in words")
    parser.add_argument("--prompt-style", choices=["user", "system"], default="user",
                        help="--baseline prompt: the instruction prepended to the user turn, or as the system message")
    parser.add_argument("--batch-prompts", type=int, default=None,
                        help="prompts searched at once, each batch saved when done (default: from free GPU memory on CUDA, 8 on CPU)")
    parser.add_argument("--restart", action="store_true", help="discard the folder's finished prompts and start again")
    add_search_options(parser)


@command("preference-data", "make DPO preference pairs: SelfControl's (or instructed) answers over the plain ones (resumable)",
         _data_args)
def preference_data_cmd(args: argparse.Namespace) -> int:
    from ..preference.data import preference_data
    from ..selfcontrol.tasks import get_task

    config, task = search_config(args), get_task(args.task)
    task.split(args.split)  # an unknown split is refused before the model loads
    if args.baseline == "prompt":
        task.instructed("x", args.prompt_style)  # so is a task without an instruction
    model = load(args)
    data = preference_data(model, task, args.split, args.out, limit=args.limit, min_gain=args.min_gain,
                           baseline=args.baseline, prompt_style=args.prompt_style, config=config,
                           batch_size=args.batch_prompts, restart=args.restart, progress=not args.json)
    if args.json:
        print(json.dumps({"out": str(data.out_dir), **{k: data.manifest[k] for k in (
            "mode", "n_prompts", "n_kept", "dropped", "mean_gain_kept", "seconds_per_prompt")}}))
    else:
        print(data.summary())
        print(f"train on it with: python -m workbench dpo --data {data.out_dir} --out MODEL_DIR")
    return 0
