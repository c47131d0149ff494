"""GPU benchmark on random weights shaped like Llama-3.2-1B and Llama-3.1-8B (no download), side by side in one run.

    python -m analyses.gpu_bench                 # bfloat16 on CUDA, both shapes (under 5 minutes on one H200)
    python -m analyses.gpu_bench --small         # a tiny Llama-3 shape on the CPU (the test suite runs this)
    python -m analyses.gpu_bench --json          # one JSON object instead of the table

Per shape, each with the peak GPU memory it took:

1. suffix gradient (all layers) vs one forward on the same ids;
2. hooked generation vs HF-native ``generate`` (same ids, same number of tokens);
3. generation under a fixed control on all layers vs plain;
4. one search iteration in units of one plain generation: searches of 1 and 3
   iterations whose every candidate is accepted (random weights accept nothing
   meaningful, so the count is fixed), the difference over 2;
5. search throughput at 1, 8 and 32 prompts: ``self_control_many`` when the
   workbench has it (one batch), else ``self_control`` in a loop (said so in
   the output, and measured on at most 8 prompts since a loop's rate does not
   depend on how many prompts wait).

The models are built in memory from ``LlamaConfig`` with the published sizes
(:data:`workbench.model.families.SHAPES`) and a Llama-3 tokenizer folder with
its chat template (:func:`workbench.model.families.build_tokenizer`); their
answers are noise, so only the costs mean anything. Writes
``results/gpu_bench/gpu_bench.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from analyses.common import out_dir
from workbench.model.families import build_random_model, build_tokenizer, family_config
from workbench.model.loading import from_hf_model
from workbench.selfcontrol import search
from workbench.selfcontrol.control import Control
from workbench.selfcontrol.search import SelfControlConfig, self_control
from workbench.selfcontrol.suffix import suffix_gradients
from workbench.selfcontrol.tasks import get_task

FULL = {"shapes": ["llama-3.2-1b", "llama-3.1-8b"], "device": "cuda", "dtype": torch.bfloat16,
        "new_tokens": 32, "batches": [1, 8, 32], "repeats": 3, "n_steps": 4}
SMALL = {"shapes": ["tiny"], "device": "cpu", "dtype": torch.float32,
         "new_tokens": 6, "batches": [1, 2, 4], "repeats": 1, "n_steps": 2}
TASK = "angry2peaceful"
LOOP_CAP = 8  # prompts a loop fallback is timed on


def build(shape: str, device: str, dtype: torch.dtype, folder: Path) -> Any:
    """A hooked Llama-3 model of ``shape`` with random weights, built on ``device`` (only config and tokenizer on disk)."""
    from transformers import AutoTokenizer

    config = family_config("llama3", build_tokenizer("llama3", folder), shape)
    config.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)  # as a downloaded model's: read back from its folder
    # tiny: the workbench's test init (wide, so a 64-wide model is not flat); published shapes: their own init
    hf = build_random_model(config, dtype=dtype, init_std=0.2 if shape == "tiny" else None, device=device)
    return from_hf_model(hf, tokenizer, folder, model_id=f"random-{shape}", device=device, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def peak_memory(device: torch.device, into: dict[str, Any], name: str) -> Iterator[None]:
    """``into[name + "_peak_gib"]``: the most GPU memory allocated inside the block (``None`` off CUDA)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield
    into[f"{name}_peak_gib"] = (round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                                if device.type == "cuda" else None)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup`` (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(model: Any, settings: dict[str, Any], rows: dict[str, Any]) -> None:
    """Fill ``rows`` with the five measurements on ``model`` (see the module docstring)."""
    device, n, repeats = model.device, settings["new_tokens"], settings["repeats"]
    task = get_task(TASK)
    suffixes = task.compile(model)
    texts = task.split("train")
    prompt = model.chat_ids(texts[0])
    response = model.generate([prompt], max_new_tokens=n, stop_at_eos=False).tokens[0]
    ids = model.as_tensor(prompt + response + list(suffixes[0].ids))
    rows["sequence_tokens"] = ids.shape[1]

    def forward() -> None:
        with torch.no_grad():
            model.bridge(ids)

    with peak_memory(device, rows, "forward"):
        rows["forward_s"] = timed(forward, device, repeats)
    with peak_memory(device, rows, "gradient"):
        rows["gradient_s"] = timed(lambda: suffix_gradients(model, prompt, response, suffixes), device, repeats)

    tensor = model.as_tensor(prompt)
    with peak_memory(device, rows, "hooked_generate"):
        rows["hooked_generate_s"] = timed(
            lambda: model.generate([prompt], max_new_tokens=n, stop_at_eos=False), device, repeats)

    def hf_generate() -> None:
        with torch.no_grad():
            model.decoder.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=model.pad_token_id)

    with peak_memory(device, rows, "hf_generate"):
        rows["hf_generate_s"] = timed(hf_generate, device, repeats)

    control: Control = suffix_gradients(model, prompt, response, suffixes).step(-0.002)

    def controlled() -> None:
        with control.applied(model):
            model.generate([prompt], max_new_tokens=n, stop_at_eos=False)

    with peak_memory(device, rows, "controlled_generate"):
        rows["controlled_generate_s"] = timed(controlled, device, repeats)

    # every candidate accepted (threshold far below any score change, no fluency guard): a fixed iteration count
    fixed = SelfControlConfig(n_steps=settings["n_steps"], max_new_tokens=n, threshold=-1e9, fluency_guard=False,
                              progress=False)
    runs = {}
    with peak_memory(device, rows, "search"):
        for k in (1, 3):
            cfg = replace(fixed, iterations=k)
            self_control(model, texts[0], task, cfg)  # warm-up
            _sync(device)
            start = time.perf_counter()
            result = self_control(model, texts[0], task, cfg)
            _sync(device)
            runs[k] = (time.perf_counter() - start, len(result.iterations))
    rows["search_iterations_run"] = {str(k): it for k, (_, it) in runs.items()}
    rows["search_iteration_s"] = (runs[3][0] - runs[1][0]) / max(1, runs[3][1] - runs[1][1])

    many = getattr(search, "self_control_many", None)
    rows["batched_search"] = "self_control_many" if many else f"self_control in a loop (no self_control_many; timed on at most {LOOP_CAP} prompts)"
    throughput = {}
    cfg = replace(fixed, iterations=2)
    for b in settings["batches"]:
        prompts = [texts[i % len(texts)] for i in range(b if many else min(b, LOOP_CAP))]
        with peak_memory(device, throughput, str(b)):
            _sync(device)
            start = time.perf_counter()
            if many:
                many(model, prompts, task, cfg, batch_size=b, progress=False)
            else:
                for text in prompts:
                    self_control(model, text, task, cfg)
            _sync(device)
            seconds = time.perf_counter() - start
        throughput[str(b)] = {"prompts": len(prompts), "seconds": round(seconds, 3),
                              "prompts_per_s": round(len(prompts) / seconds, 3),
                              "peak_gib": throughput.pop(f"{b}_peak_gib")}
    rows["search_throughput"] = throughput
    rows["gradient_over_forward"] = rows["gradient_s"] / rows["forward_s"]
    rows["hooked_over_hf_generate"] = rows["hooked_generate_s"] / rows["hf_generate_s"]
    rows["controlled_over_plain"] = rows["controlled_generate_s"] / rows["hooked_generate_s"]
    rows["search_iteration_in_generations"] = rows["search_iteration_s"] / rows["hooked_generate_s"]


def table(results: dict[str, Any]) -> str:
    """The printed (and README) table: one column per shape."""
    shapes = list(results["shapes"])
    cols = [results["shapes"][s] for s in shapes]

    def mem(row: dict[str, Any], name: str) -> str:
        value = row.get(f"{name}_peak_gib")
        return "" if value is None else f" ({value:.1f} GiB)"

    lines = [
        f"| measurement (peak GPU memory) | {' | '.join(shapes)} |",
        "|---|" + "---|" * len(shapes),
        "| suffix gradient / forward | " + " | ".join(
            f"{c['gradient_over_forward']:.2f}x{mem(c, 'gradient')}" for c in cols) + " |",
        "| hooked / HF-native generation | " + " | ".join(
            f"{c['hooked_over_hf_generate']:.2f}x{mem(c, 'hooked_generate')}" for c in cols) + " |",
        "| controlled / plain generation | " + " | ".join(
            f"{c['controlled_over_plain']:.2f}x{mem(c, 'controlled_generate')}" for c in cols) + " |",
        "| one search iteration, in plain generations | " + " | ".join(
            f"{c['search_iteration_in_generations']:.2f}{mem(c, 'search')}" for c in cols) + " |",
    ]
    for b in results["batches"]:
        cells = []
        for c in cols:
            t = c["search_throughput"][str(b)]
            peak = "" if t["peak_gib"] is None else f" ({t['peak_gib']:.1f} GiB)"
            cells.append(f"{t['prompts_per_s']:.2f} prompts/s{peak}")
        lines.append(f"| search throughput, batch {b} | " + " | ".join(cells) + " |")
    lines.append("| plain generation seconds ({} tokens) | ".format(results["new_tokens"]) + " | ".join(
        f"{c['hooked_generate_s']:.3f}" for c in cols) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a tiny Llama-3 shape on the CPU in float32 (for tests)")
    parser.add_argument("--shapes", default=None, help="comma-separated shapes (default: llama-3.2-1b,llama-3.1-8b)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --small)")
    parser.add_argument("--out", default="results/gpu_bench", help="output folder (gitignored)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    settings = dict(SMALL if args.small else FULL)
    if args.shapes:
        settings["shapes"] = [s.strip() for s in args.shapes.split(",") if s.strip()]
    device = torch.device(args.device or settings["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; run on a GPU machine, or use --small for the CPU check")
    start = time.perf_counter()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(settings["dtype"]).replace("torch.", ""), "torch": torch.__version__,
        "new_tokens": settings["new_tokens"], "batches": settings["batches"], "task": TASK, "shapes": {},
    }
    for shape in settings["shapes"]:
        with tempfile.TemporaryDirectory(prefix=f"gpu-bench-{shape}-") as folder:
            built = time.perf_counter()
            model = build(shape, str(device), settings["dtype"], Path(folder))
            rows: dict[str, Any] = {"build_s": round(time.perf_counter() - built, 1), "n_layers": model.n_layers,
                                    "d_model": model.d_model}
            measure(model, settings, rows)
            results["shapes"][shape] = rows
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results["seconds"] = round(time.perf_counter() - start, 1)
    folder = out_dir(args.out)
    (folder / "gpu_bench.json").write_text(json.dumps(results, indent=2))
    (folder / "gpu_bench.md").write_text(table(results) + "\n")
    if args.json:
        print(json.dumps(results))
    else:
        print(f"{results['gpu']} ({results['device']}, {results['dtype']}, torch {results['torch']}), {results['date']}; "
              f"search: {results['shapes'][settings['shapes'][0]].get('batched_search')}")
        print(table(results))
        print(f"{results['seconds']} s in all; written to {folder}")
    return results


if __name__ == "__main__":
    main()
