"""Prefix Controller study: does a trained prefix recover SelfControl's gain at no search cost?

    python -m analyses.prefix_study [--task angry2peaceful] [--limit 40] [--test-limit N] [--threads N]

1. Synthesise SelfControl data on the task's ``train`` prompts (resumable: rerun to continue).
2. Train a prefix controller on it (held-out MSE vs no prefix).
3. On the ``test`` prompts: mean suffix score (clean judge) uncontrolled, with SelfControl
   (itself a resumable synthesis on the test split), and with the prefix; the fraction of
   SelfControl's gain the prefix recovers; seconds per prompt for each.
4. Speed: greedy generation of a fixed number of tokens with the prefix vs without, interleaved.

Writes ``prefix_study.json`` and ``prefix_study.md`` into ``--out``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

import workbench as wb
from analyses.common import base_parser, out_dir
from workbench.evaluation.judges import bootstrap_ci
from workbench.prefix.controller import PrefixController
from workbench.prefix.synthesis import read_index, synthesize
from workbench.prefix.training import train_prefix
from workbench.selfcontrol.search import SelfControlConfig
from workbench.selfcontrol.suffix import score_responses
from workbench.selfcontrol.tasks import get_task


def interleaved_ratio(model, controller: PrefixController, ids: list[int], tokens: int, repeats: int) -> dict:
    """Median seconds of ``tokens``-token greedy generation without / with the prefix, alternating runs."""
    def plain():
        return model.generate([ids], max_new_tokens=tokens, stop_at_eos=False)

    def prefixed():
        with controller.applied(model):
            return model.generate([ids], max_new_tokens=tokens, stop_at_eos=False)

    plain(), prefixed()  # warm up
    times: dict[str, list[float]] = {"uncontrolled": [], "prefix": []}
    for _ in range(repeats):
        for name, fn in (("uncontrolled", plain), ("prefix", prefixed)):
            start = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - start)
            assert len(out.tokens[0]) == tokens
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"new_tokens": tokens, "prompt_tokens": len(ids), "prefix_tokens": controller.n_tokens, "repeats": repeats,
            "uncontrolled_s": med["uncontrolled"], "prefix_s": med["prefix"], "ratio": med["prefix"] / med["uncontrolled"],
            "all_s": times}


def evaluate(model, task, controllers: dict[str, PrefixController], test_dir: Path, max_new_tokens: int) -> list[dict]:
    """Per test prompt: the SelfControl record (scores, seconds) plus fresh uncontrolled and prefixed generations."""
    rows = []
    suffixes = task.compile(model)
    for entry in read_index(test_dir):
        ids = entry["prompt_ids"]
        start = time.perf_counter()
        plain = model.generate([ids], max_new_tokens=max_new_tokens).tokens[0]
        row = {"prompt": entry["prompt"], "uncontrolled_s": time.perf_counter() - start,
               "selfcontrol_score": entry["score"], "selfcontrol_initial_score": entry["initial_score"],
               "selfcontrol_nll": entry["nll"], "selfcontrol_s": entry["seconds"], "uncontrolled": model.decode(plain),
               "selfcontrol": entry["response"]}
        responses = [plain]
        for name, controller in controllers.items():
            start = time.perf_counter()
            with controller.applied(model):
                responses.append(model.generate([ids], max_new_tokens=max_new_tokens).tokens[0])
            row[f"{name}_s"] = time.perf_counter() - start
            row[name] = model.decode(responses[-1])
        scores = score_responses(model, [ids], responses, suffixes)
        for i, name in enumerate(["uncontrolled", *controllers]):
            row[f"{name}_score"], row[f"{name}_nll"] = float(scores.scores[i]), float(scores.nll[i])
        rows.append(row)
    return rows


LABELS = {"uncontrolled": "uncontrolled", "selfcontrol": "SelfControl (search per prompt)"}


def markdown(result: dict) -> str:
    s, sp = result["summary"], result["speed"]
    t = next(iter(result["training"].values()))
    lines = [
        f"### Prefix controller on {result['model']} — task `{result['task']}`",
        "",
        f"Synthesised {t['n_records']} `train` prompts; {t['n_kept']} kept by the filters "
        f"({', '.join(f'{k}: {v}' for k, v in t['filtered'].items()) or 'none dropped'}); {t['n_train']} to train, "
        f"{t['n_val']} held out; {t['settings']['n_tokens']} virtual tokens. Evaluated on {s['n_test']} `test` prompts, "
        "scores by the clean model's suffix judge.",
        "",
        "| condition | mean suffix score (95% CI) | gain | share of SelfControl's gain | mean NLL | seconds / prompt |",
        "|---|---|---|---|---|---|",
    ]
    for name in result["conditions"]:
        m, lo, hi = s[f"{name}_score"]
        label = LABELS.get(name, f"prefix controller ({name.removeprefix('prefix_')} loss)")
        share = "-" if name == "uncontrolled" else f"{s[f'{name}_recovered']:.2f}"
        lines.append(f"| {label} | {m:.4f} ({lo:.4f}–{hi:.4f}) | {s[f'{name}_gain']:+.4f} | {share} | "
                     f"{s[f'{name}_nll']:.3f} | {s[f'{name}_s']:.2f} |")
    lines += ["", "| controller | held-out MSE: no prefix / untrained / trained | held-out relative error: no prefix / untrained / trained |",
              "|---|---|---|"]
    for name, tr in result["training"].items():
        lines.append(f"| {name} | {tr['baseline_val_mse']:.4g} / {tr['init_val_mse']:.4g} / {tr['best_val_mse']:.4g} | "
                     f"{tr['baseline_val_relative']:.4f} / {tr['init_val_relative']:.4f} / {tr['best_val_relative']:.4f} |")
    lines += [
        "",
        f"Speed: {sp['new_tokens']}-token greedy generation {sp['prefix_s']:.3f} s with a {sp['prefix_tokens']}-token "
        f"prefix vs {sp['uncontrolled_s']:.3f} s without: **{sp['ratio']:.3f}x** (target <= 1.1x; median of "
        f"{sp['repeats']} interleaved runs, {result['threads']} torch thread(s)).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = base_parser(__doc__, "prefix_study")
    parser.add_argument("--task", default="angry2peaceful")
    parser.add_argument("--limit", type=int, default=40, help="train prompts to synthesise (at most the split's size)")
    parser.add_argument("--test-limit", type=int, default=None, help="test prompts to evaluate (default: all)")
    parser.add_argument("--n-tokens", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate for the mse loss")
    parser.add_argument("--relative-lr", type=float, default=1e-2, help="learning rate for the relative loss")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-shift-fraction", type=float, default=0.5)
    parser.add_argument("--losses", default="mse,relative", help="train one controller per loss (mse, relative)")
    parser.add_argument("--keep-no-gain", action="store_true", help="also train on records whose score did not improve")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="response length for search and evaluation")
    parser.add_argument("--speed-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; 1 avoids thrashing on a shared CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = out_dir(args.out)
    model = wb.load_model(args.model, device=args.device, dtype=args.dtype, progress=True)
    task = get_task(args.task)
    config = SelfControlConfig(max_new_tokens=args.max_new_tokens)
    train_prompts = task.split("train")
    if args.limit > len(train_prompts):
        print(f"note: task {task.id} has {len(train_prompts)} train prompts; --limit {args.limit} uses all of them")
    synthesize(model, task, "train", folder / "train_data", limit=args.limit, config=config)
    controllers, reports = {}, {}
    for loss in args.losses.split(","):
        controller, report = train_prefix(
            model, folder / "train_data", n_tokens=args.n_tokens, epochs=args.epochs,
            lr=args.lr if loss == "mse" else args.relative_lr,
            batch_size=args.batch_size, max_shift_fraction=args.max_shift_fraction,
            require_gain=not args.keep_no_gain, loss=loss,
        )
        print(report.summary())
        controller.save(folder / f"controller_{loss}")
        controllers[f"prefix_{loss}"], reports[f"prefix_{loss}"] = controller, report.to_dict()
    synthesize(model, task, "test", folder / "test_data", limit=args.test_limit, config=config)
    rows = evaluate(model, task, controllers, folder / "test_data", args.max_new_tokens)
    conditions = ["uncontrolled", "selfcontrol", *controllers]
    summary: dict = {"n_test": len(rows)}
    for name in conditions:
        summary[f"{name}_score"] = bootstrap_ci([r[f"{name}_score"] for r in rows])
        summary[f"{name}_nll"] = statistics.mean(r[f"{name}_nll"] for r in rows)
        summary[f"{name}_s"] = statistics.mean(r[f"{name}_s"] for r in rows)
    base = summary["uncontrolled_score"][0]
    for name in conditions:
        summary[f"{name}_gain"] = summary[f"{name}_score"][0] - base
    for name in conditions[1:]:
        summary[f"{name}_recovered"] = (summary[f"{name}_gain"] / summary["selfcontrol_gain"]
                                        if summary["selfcontrol_gain"] != 0 else float("nan"))
        summary[f"{name}_beats_uncontrolled"] = sum(r[f"{name}_score"] > r["uncontrolled_score"] for r in rows)
    first = next(iter(controllers.values()))
    speed = interleaved_ratio(model, first, model.chat_ids(rows[0]["prompt"]), args.speed_tokens, args.repeats)
    result = {"model": model.model_id, "task": task.id, "train_prompts_available": len(train_prompts),
              "settings": vars(args), "conditions": conditions, "training": reports, "summary": summary,
              "speed": speed, "threads": torch.get_num_threads(), "rows": rows}
    (folder / "prefix_study.json").write_text(json.dumps(result, indent=2))
    (folder / "prefix_study.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
