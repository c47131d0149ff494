"""Throughput of SelfControl over many prompts: one prompt at a time vs batched across prompts.

The README's search settings (3 iterations, 4 step sizes, 1 branch, 40 new tokens) on the
first 8 ``test`` prompts of angry2peaceful, run once sequentially (``self_control`` per prompt)
and once batched (``self_control_many``, batch 8), per dtype. Prints prompts per minute, their
ratio, the loop's amortized cost per prompt in plain 40-token generations (measured side by
side), the mean score gain both ways, how often both accepted the same step (near-ties within
1e-4 count as the same; their share is printed too), and where the batched run's time went.

    python -m analyses.throughput [--model M] [--dtypes float32,bfloat16] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

import workbench as wb
from workbench.selfcontrol import search
from workbench.selfcontrol.search import (
    SelfControlConfig,
    compare_searches,
    self_control,
    self_control_many,
)
from workbench.selfcontrol.tasks import get_task

TASK = "angry2peaceful"


def _plain_seconds(model: wb.HookedChatModel, ids: list[int], tokens: int, repeats: int = 3) -> tuple[float, float]:
    """Median wall and CPU time of one plain greedy generation of exactly ``tokens`` new tokens."""
    model.generate([ids], max_new_tokens=tokens, stop_at_eos=False)  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        model.generate([ids], max_new_tokens=tokens, stop_at_eos=False)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def _sync(model: wb.HookedChatModel) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def measure(model: wb.HookedChatModel, prompts: Sequence[str], config: SelfControlConfig, batch: int) -> dict[str, Any]:
    """Sequential vs batched search of ``prompts`` on ``model``, and the figures the README table reports."""
    plain, plain_cpu = _plain_seconds(model, model.chat_ids(prompts[0]), config.max_new_tokens)
    load_before = os.getloadavg()[0]
    _sync(model)
    start, start_cpu = time.perf_counter(), time.process_time()
    sequential = [self_control(model, p, TASK, config) for p in prompts]
    _sync(model)
    seq_seconds, seq_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    search.TIMINGS.update(gradient=0.0, generation=0.0, scoring=0.0)
    start, start_cpu = time.perf_counter(), time.process_time()
    batched = self_control_many(model, prompts, TASK, config, batch_size=batch)
    _sync(model)
    batch_seconds, batch_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    split = dict(search.TIMINGS)
    counts = [compare_searches(s, b) for s, b in zip(sequential, batched, strict=True)]
    compared = sum(c["compared"] for c in counts)
    n = len(prompts)
    return {
        "prompts": n,
        "batch_size": batch,
        "plain_generation_seconds": round(plain, 5),
        "sequential_seconds": round(seq_seconds, 4),
        "batched_seconds": round(batch_seconds, 4),
        "sequential_prompts_per_min": round(60 * n / seq_seconds, 3),
        "batched_prompts_per_min": round(60 * n / batch_seconds, 3),
        "ratio": round(seq_seconds / batch_seconds, 3),
        "amortized_plain_generations": round(batch_seconds / n / plain, 3),
        "sequential_amortized_plain_generations": round(seq_seconds / n / plain, 3),
        "same_step_fraction": round(sum(c["same"] + c["tie"] for c in counts) / max(1, compared), 4),
        "tie_fraction": round(sum(c["tie"] for c in counts) / max(1, compared), 4),
        "iterations_compared": compared,
        "gain_sequential": round(statistics.fmean(r.gain for r in sequential), 5),
        "gain_batched": round(statistics.fmean(r.gain for r in batched), 5),
        # CPU time of this process: on a shared machine it moves less with the other processes' load than wall time
        "cpu_ratio": round(seq_cpu / max(batch_cpu, 1e-9), 3),
        "cpu_amortized_plain_generations": round(batch_cpu / n / max(plain_cpu, 1e-9), 3),
        "cpu_sequential_amortized_plain_generations": round(seq_cpu / n / max(plain_cpu, 1e-9), 3),
        "threads": torch.get_num_threads(),
        "batched_time_split": {k: round(v / max(batch_seconds, 1e-9), 3) for k, v in split.items()},
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated, e.g. float32,bfloat16")
    parser.add_argument("--json", action="store_true", help="print one JSON object keyed by dtype")
    parser.add_argument("--n-prompts", type=int, default=8, help="test prompts of angry2peaceful (default 8)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per batch in the batched run (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in ("float32", "bfloat16", "float16") for d in dtypes):
        parser.error(f"--dtypes takes float32, bfloat16 or float16, got {args.dtypes!r}")
    prompts = get_task(TASK).split("test")[: args.n_prompts]
    config = SelfControlConfig(iterations=3, n_steps=4, branches=1, max_new_tokens=args.max_new_tokens, progress=False)
    out: dict[str, Any] = {}
    for dtype in dtypes:
        model = wb.load_model(args.model, device=args.device, dtype=dtype, progress=False)
        out[dtype] = {"model": model.model_id, "device": str(model.device), **measure(model, prompts, config, args.batch)}
        del model
    if args.json:
        print(json.dumps(out))
    else:
        for dtype, r in out.items():
            print(f"{r['model']} {dtype} on {r['device']}, {r['prompts']} prompts, batch {r['batch_size']}:")
            print(f"  prompts/min: sequential {r['sequential_prompts_per_min']:.2f}, batched {r['batched_prompts_per_min']:.2f} "
                  f"(ratio {r['ratio']:.2f}x)")
            print(f"  loop cost per prompt in plain {args.max_new_tokens}-token generations "
                  f"({r['plain_generation_seconds']:.2f} s each): sequential {r['sequential_amortized_plain_generations']:.2f}, "
                  f"batched {r['amortized_plain_generations']:.2f}")
            print(f"  mean gain: sequential {r['gain_sequential']:+.4f}, batched {r['gain_batched']:+.4f}; same step "
                  f"{r['same_step_fraction']:.0%} of {r['iterations_compared']} iterations (near-ties {r['tie_fraction']:.0%})")
            print(f"  in CPU time: ratio {r['cpu_ratio']:.2f}x, loop cost sequential "
                  f"{r['cpu_sequential_amortized_plain_generations']:.2f}, batched {r['cpu_amortized_plain_generations']:.2f}")
            print(f"  batched time: {', '.join(f'{k} {v:.0%}' for k, v in r['batched_time_split'].items())}; "
                  f"load average {r['load_average_1min']}, {r['threads']} threads")
    return out


if __name__ == "__main__":
    main()
