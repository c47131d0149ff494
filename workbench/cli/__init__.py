"""Command line: ``python -m workbench <command>``.

Each submodule of this package registers one group of commands with
:func:`command`; they are discovered automatically, so a new group is a new
file. Commands are thin wrappers over library functions. May import every
stage (the top of the pipeline), lazily inside handlers so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import pkgutil
import sys
from collections.abc import Callable, Sequence
from typing import Literal

from ..errors import InputError, WorkbenchError

Handler = Callable[[argparse.Namespace], int]
Setup = Callable[[argparse.ArgumentParser], None]
_COMMANDS: dict[str, tuple[str, Setup, Handler]] = {}


def command(name: str, help: str, setup: Setup | None = None) -> Callable[[Handler], Handler]:
    """Register ``handler`` as ``python -m workbench <name>``; ``setup`` adds its arguments."""

    def register(handler: Handler) -> Handler:
        _COMMANDS[name] = (help, setup or (lambda parser: None), handler)
        return handler

    return register


def layer_list(text: str) -> list[int] | Literal["all"] | None:
    """``--layers``-style value: ``0,1,2`` (each once), ``all``, or empty for the flag's default.

    An argparse ``type``: a bad value exits with code 2 and an ``error:`` line
    before any model loads. Ranges are checked by the model once loaded.
    """
    text = text.strip()
    if text in ("", "all"):
        return text or None
    try:
        layers = [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer numbers, e.g. 0,1,2 or all") from None
    repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"layer(s) {repeated} named more than once in {text!r}; name each layer once")
    return layers


def number_list(text: str) -> list[float]:
    """A comma-separated list of finite numbers (an argparse ``type``)."""
    try:
        values = [float(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 0,0.05,0.1") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} holds a non-finite number")
    return values


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def batch_prompts_option(parser: argparse.ArgumentParser) -> None:
    """``--batch-prompts N``: prompts SelfControl searches at once (commands that search many prompts)."""
    parser.add_argument("--batch-prompts", type=positive_int, default=None, metavar="N",
                        help="prompts searched together in one batch (default: from free GPU memory on CUDA, "
                             "8 on CPU, the measured best); results do not depend on it. With --ray each worker searches "
                             "its chunk (--ray-chunk) as one batch")


def common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=None, help="hub id, local folder or 'tiny-random' (default: embedded SmolLM2-135M-Instruct)")
    common.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    common.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on cuda, fp32 on cpu)")
    common.add_argument("--device-map", default=None,
                        help="spread a large model over devices: auto, balanced, sequential, or a JSON object of "
                             "module name to device (instead of --device)")
    common.add_argument("--max-memory", default=None,
                        help='with --device-map: per-device budget as JSON, e.g. \'{"0": "20GiB", "1": "20GiB", "cpu": "60GiB"}\'')
    common.add_argument("--json", action="store_true", help="print one JSON object")
    return common


def _json_option(value: str | None, flag: str) -> object:
    if value is None or not value.lstrip().startswith("{"):
        return value
    try:
        data = json.loads(value)
    except ValueError as err:
        raise InputError(f"{flag}: not valid JSON ({err})") from err
    return {int(k) if k.isdigit() else k: v for k, v in data.items()}  # accelerate names GPUs by index


def load_args(args: argparse.Namespace) -> dict[str, object]:
    """``load_model``'s keyword arguments from the common options (a Ray worker loads the model from these)."""
    max_memory = _json_option(args.max_memory, "--max-memory")
    if isinstance(max_memory, str):
        raise InputError("--max-memory takes a JSON object, e.g. '{\"0\": \"20GiB\", \"cpu\": \"60GiB\"}'")
    return {"name": args.model, "device": args.device, "dtype": args.dtype, "progress": not args.json,
            "device_map": _json_option(args.device_map, "--device-map"), "max_memory": max_memory}


def load(args: argparse.Namespace):
    """The model named by the common options."""
    from ..model.loading import load_model

    return load_model(**load_args(args))


def ray_options(parser: argparse.ArgumentParser) -> None:
    """``--ray [ADDRESS]`` and its knobs (commands that shard prompts over Ray workers)."""
    group = parser.add_argument_group("Ray (optional extra workbench[distributed])")
    group.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="shard the prompts over Ray workers, each loading the model once (one per GPU): "
                            "without ADDRESS on a local cluster started for the run; 'auto' joins the cluster "
                            "`ray start --head` runs on this machine; or host:port")
    group.add_argument("--ray-workers", type=int, default=None,
                       help="number of Ray workers (default: one per GPU; without GPUs one per 4 CPUs)")
    group.add_argument("--ray-chunk", type=int, default=2,
                       help="most prompts a worker takes at a time (small: better balance; default 2)")
    group.add_argument("--ray-gpus-per-worker", type=int, default=1,
                       help="GPUs each worker reserves (a model larger than one GPU: with --device-map auto; default 1)")


def ray_settings(args: argparse.Namespace):
    """The :class:`workbench.distributed.jobs.RaySettings` of ``--ray``, or ``None`` without it (Ray is then never imported)."""
    if args.ray is None:
        return None
    if args.ray_workers is not None and args.ray_workers < 1:
        raise InputError(f"--ray-workers must be at least 1, got {args.ray_workers}")
    if args.ray_chunk < 1:
        raise InputError(f"--ray-chunk must be at least 1, got {args.ray_chunk}")
    if args.ray_gpus_per_worker < 1:
        raise InputError(f"--ray-gpus-per-worker must be at least 1, got {args.ray_gpus_per_worker}")
    from ..distributed.jobs import RaySettings

    return RaySettings(address=None if args.ray == "local" else args.ray, workers=args.ray_workers,
                       chunk_size=args.ray_chunk, gpus_per_worker=args.ray_gpus_per_worker)


def build_parser() -> argparse.ArgumentParser:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    parser = argparse.ArgumentParser(prog="python -m workbench", description="SelfControl workbench: steer and study LLM behaviour with suffix gradients")
    sub = parser.add_subparsers(dest="command", required=True)
    common = common_options()
    for name, (help_text, setup, _) in _COMMANDS.items():
        setup(sub.add_parser(name, parents=[common], help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command][2](args)
    except WorkbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a path that cannot be read or written (a file where a folder belongs, no permission)
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
