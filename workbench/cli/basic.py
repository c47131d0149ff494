"""``info`` and ``chat``: look at the model."""

from __future__ import annotations

import argparse
import json
import time

from . import command, load


@command("info", "model id, layers, d_model, device, dtype, cache path")
def info(args: argparse.Namespace) -> int:
    data = load(args).info()
    if args.json:
        print(json.dumps(data))
    else:
        for key, value in data.items():
            print(f"{key:>10}: {value}")
    return 0


def _chat_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)


@command("chat", "answer one prompt through the hooked model", _chat_args)
def chat(args: argparse.Namespace) -> int:
    model = load(args)
    start = time.perf_counter()
    response = model.chat(args.prompt, max_new_tokens=args.max_new_tokens)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"prompt": args.prompt, "response": response, "seconds": round(seconds, 3)}))
    else:
        print(f"user> {args.prompt}\n{model.model_id}> {response}")
    return 0
