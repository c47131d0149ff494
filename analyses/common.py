"""Shared helpers for the studies: argument parsing, output folder, timing."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import workbench as wb
from workbench.analysis import control_cache
from workbench.cli.control import add_search_options, search_config
from workbench.selfcontrol.search import SelfControlConfig


def base_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", default=f"results/{default_out}", help="output folder (gitignored)")
    return parser


def out_dir(path: str) -> Path:
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def timed(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class Study:
    """What every control study starts from: parsed arguments, search settings, output folder, model."""

    args: argparse.Namespace
    config: SelfControlConfig
    out: Path
    model: wb.HookedChatModel
    start: float = field(default_factory=time.perf_counter)

    @classmethod
    def from_parser(cls, parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> Study:
        """Add the search knobs (analysis defaults), parse, make the output folder, load the model."""
        parser.add_argument("--docs-figure", default=None, help="also copy the study's main figure here (README figure)")
        parser.add_argument("--batch-prompts", type=int, default=None, metavar="N",
                            help="prompts searched at once (default: from free memory on CUDA, the measured best on CPU)")
        add_search_options(parser)
        parser.set_defaults(max_new_tokens=control_cache.ANALYSIS_DEFAULTS["max_new_tokens"], json=True)
        args = parser.parse_args(argv)
        if args.batch_prompts is not None and args.batch_prompts < 1:
            parser.error(f"--batch-prompts must be >= 1, got {args.batch_prompts}")
        config = search_config(args)
        out = out_dir(args.out)
        start = time.perf_counter()
        model = wb.load_model(args.model, device=args.device, dtype=args.dtype, progress=True)
        return cls(args, config, out, model, start)

    def finish(self, name: str, summary: dict[str, Any], figure: str) -> None:
        """Write ``<name>.json`` (with model, seconds, cache use); copy the main ``figure`` to ``--docs-figure`` if given."""
        summary = {"model": self.model.model_id, **summary, "seconds": round(time.perf_counter() - self.start, 1),
                   "cache": dict(control_cache.stats)}
        (self.out / f"{name}.json").write_text(json.dumps(summary, indent=1))
        if self.args.docs_figure:
            Path(self.args.docs_figure).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.out / figure, self.args.docs_figure)
        print(f"wrote {self.out} in {summary['seconds']} s (cache: {summary['cache']})")


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """One CSV row per dict (the first row's keys are the header)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
