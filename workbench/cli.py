"""Command line: ``python -m workbench <command>``. Each command is a thin
wrapper over the library function of the same name."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence

from .errors import WorkbenchError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str) -> Callable:
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable:
        COMMANDS[name] = fn
        return fn

    return register


def _model(args: argparse.Namespace):
    from .loading import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype)


@command("info")
def cmd_info(args: argparse.Namespace) -> int:
    model = _model(args)
    info = model.info()
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:>10}: {value}")
    return 0


@command("chat")
def cmd_chat(args: argparse.Namespace) -> int:
    model = _model(args)
    start = time.perf_counter()
    response = model.chat(args.prompt, max_new_tokens=args.max_new_tokens)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"prompt": args.prompt, "response": response, "seconds": round(seconds, 3)}))
    else:
        print(f"user> {args.prompt}\n{model.model_id}> {response}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workbench", description="SelfControl workbench")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=None, help="hub id, local folder, 'tiny-random'; default: embedded SmolLM2-135M-Instruct")
    common.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    common.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on cuda, fp32 on cpu)")
    common.add_argument("--json", action="store_true", help="print one JSON object")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", parents=[common], help="model id, layers, d_model, device, dtype, cache path")
    p = sub.add_parser("chat", parents=[common], help="answer one prompt through the hooked model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    for extend in _EXTENSIONS:
        extend(sub, common)
    return parser


_EXTENSIONS: list[Callable] = []


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except WorkbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


@command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main command (SelfControl arrives with the control loop)."""
    model = _model(args)
    print(model)
    prompt = "In two sentences, what is a suffix gradient?"
    print(f"user> {prompt}\n{model.model_id}> {model.chat(prompt, max_new_tokens=60)}")
    return 0


def _add_demo(sub, common) -> None:
    sub.add_parser("demo", parents=[common], help="the main demo on the embedded model")


_EXTENSIONS.append(_add_demo)
