"""``dpo``: train a model on preference pairs with TRL's DPOTrainer; the result loads with ``--model MODEL_DIR``."""

from __future__ import annotations

import argparse
import json
import sys

from . import command


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
