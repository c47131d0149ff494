"""``info`` and ``chat`` / ``generate``: look at the model, with or without a prefix controller."""

from __future__ import annotations

import argparse
import contextlib
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
    parser.add_argument("--prefix", default=None, help="folder of a saved prefix controller")
    parser.add_argument("--max-new-tokens", type=int, default=64)


@command("chat", "answer one prompt through the hooked model (optionally with a saved prefix controller)", _chat_args)
@command("generate", "answer one prompt, optionally with a saved prefix controller", _chat_args)
def chat(args: argparse.Namespace) -> int:
    model = load(args)
    controller = None
    if args.prefix:
        from ..prefix.controller import PrefixController

        controller = PrefixController.load(args.prefix, model)
    start = time.perf_counter()
    with controller.applied(model) if controller else contextlib.nullcontext():
        response = model.chat(args.prompt, max_new_tokens=args.max_new_tokens)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"prompt": args.prompt, "response": response, "seconds": round(seconds, 3)}))
    else:
        print(f"user> {args.prompt}\n{model.model_id}{' + prefix' if controller else ''}> {response}")
    return 0
