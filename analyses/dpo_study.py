"""DPO study: does training the model on SelfControl's own answers make it behave without any search?

    python -m analyses.dpo_study [--tasks angry2peaceful,surprised2calm] [--limit 40] [--test-limit N]
        [--epochs 4 --lr 1e-5 --beta 0.1 --lora R] [--prefix-limit 20] [search knobs] [--docs-figure PNG]

Per task (every step resumes; rerun the same command to continue an interrupted study):

1. Preference pairs from the first ``--limit`` ``train`` prompts (``workbench preference-data``):
   SelfControl's answer over the plain one, and, as the paper's baseline, the answer given when the
   behaviour is asked for in words (``--baseline prompt``) over the plain one.
2. DPO on each pair set (``workbench dpo``; reference model = the base), one model folder each.
3. A prefix controller from SelfControl data on the first ``--prefix-limit`` train prompts
   (``synthesize`` + ``train-prefix``, as ``make evaluation`` does; 0 leaves the column out).
4. ``evaluate`` on the ``test`` prompts: the base (``none``), instructed prompting, SelfControl, the
   prefix, and both DPO models (``model:DIR``), every answer judged by the BASE model's suffix score,
   the independent lexicon judges (NRC, VADER), the base's perplexity, and seconds per prompt.

Writes ``dpo_study.json``, ``dpo_study.md`` (the README table) and ``dpo_study.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import workbench as wb
from analyses.common import base_parser, out_dir
from workbench import plotting
from workbench.cli.control import add_search_options, search_config
from workbench.errors import WorkbenchError
from workbench.evaluation.report import SIGNIFICANCE_RULE, format_delta
from workbench.evaluation.runner import evaluate
from workbench.preference.data import preference_data
from workbench.preference.dpo import REPORT_FILE, read_report, train_dpo
from workbench.prefix.synthesis import synthesize
from workbench.prefix.training import train_prefix
from workbench.selfcontrol.tasks import get_task
from workbench.store import atomic_write

SOURCES = {"selfcontrol": "SelfControl pairs", "prompt": "instructed-prompting pairs"}
LABELS = {"none": "base (no control)", "prompt": "instructed prompt", "selfcontrol": "SelfControl (search)",
          "prefix": "prefix controller", "dpo_selfcontrol": "DPO on SelfControl pairs",
          "dpo_prompt": "DPO on instructed pairs"}
METRICS = {"suffix_score": ("suffix score (base judge)", 4), "lexicon_target_rate": ("NRC target rate", 3),
           "lexicon_opposite_rate": ("NRC opposite rate", 3), "vader_compound": ("VADER", 2)}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = base_parser(__doc__, "dpo_study")
    parser.add_argument("--tasks", default="angry2peaceful,surprised2calm")
    parser.add_argument("--limit", type=int, default=40, help="train prompts per task for the preference pairs")
    parser.add_argument("--test-limit", type=int, default=None, help="test prompts per task (default: all)")
    parser.add_argument("--min-gain", type=float, default=0.0, help="least suffix-score gain of a kept pair")
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lora", type=int, default=None, metavar="R", help="LoRA rank (default: full fine-tuning)")
    parser.add_argument("--dpo-batch-size", type=int, default=4)
    parser.add_argument("--prefix-limit", type=int, default=20, help="train prompts for the prefix controller (0: none)")
    parser.add_argument("--prefix-epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 avoids thrashing on a shared CPU)")
    parser.add_argument("--docs-figure", default=None, help="also copy the figure here (README figure)")
    add_search_options(parser)
    parser.set_defaults(json=False)
    return parser.parse_args(argv)


def dpo_model(data: Path, out: Path, args: argparse.Namespace, n_pairs: int) -> tuple[dict[str, Any] | None, bool]:
    """Train (or reuse) the DPO model on ``data``: (its summary, None when no pair was kept; whether it was trained now)."""
    if n_pairs == 0:
        return None, False
    wanted = {"epochs": args.epochs, "lr": args.lr, "beta": args.beta, "lora_rank": args.lora,
              "batch_size": args.dpo_batch_size, "seed": args.seed}
    old = read_report(out) if (out / REPORT_FILE).is_file() else None
    trained = old is None or old["n_pairs"] != n_pairs or any(old["settings"].get(k) != v for k, v in wanted.items())
    if trained:
        train_dpo(data, out, model=args.model, device=args.device, overwrite=True, progress=False, **wanted)
    report = read_report(out)
    return {"n_pairs": report["n_pairs"], "steps": len(report["steps"]), "final": report["final"],
            "first_loss": report["steps"][0]["loss"], "last_loss": report["steps"][-1]["loss"],
            "seconds": report["seconds"], "settings": report["settings"]}, trained


def prefix_controller(model: wb.HookedChatModel, task_id: str, folder: Path, args: argparse.Namespace,
                      config: Any) -> dict[str, Any] | None:
    """Synthesise and train (or reuse) the task's prefix controller, as ``make evaluation`` does."""
    if args.prefix_limit <= 0:
        return None
    controller = folder / "controllers" / task_id
    if not (controller / "config.json").is_file():
        try:
            trained, report = _train_prefix(model, task_id, folder, args, config)
        except WorkbenchError as err:  # e.g. no synthesised prompt improved: say so, leave the column out
            print(f"note: no prefix controller for {task_id}: {err}")
            return {"error": str(err)}
        if controller.exists():
            shutil.rmtree(controller)
        trained.save(controller)
        atomic_write(folder / "prefix_data" / f"{task_id}.report.json", json.dumps(report.to_dict(), indent=1))
    report_path = folder / "prefix_data" / f"{task_id}.report.json"
    return json.loads(report_path.read_text()) if report_path.is_file() else {}


def _train_prefix(model: wb.HookedChatModel, task_id: str, folder: Path, args: argparse.Namespace, config: Any) -> Any:
    data = synthesize(model, task_id, "train", folder / "prefix_data" / task_id, limit=args.prefix_limit,
                      config=config, progress=False)
    return train_prefix(model, data, n_tokens=2, epochs=args.prefix_epochs, lr=1e-2, batch_size=8,
                        max_shift_fraction=0.5, loss="relative")


def method_label(name: str, folder: Path) -> str:
    if name.startswith("model:"):
        return "dpo_" + Path(name.removeprefix("model:")).name
    return name


def table(result: dict[str, Any]) -> str:
    """The README table: per task and method, the base's judge, the independent judges, perplexity, speed."""
    lines = [
        "| task | method | pairs | suffix score [95% CI] | Δ vs base | NRC target Δ | NRC opposite Δ | VADER Δ | "
        "perplexity | s / prompt |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    for task, entry in result["tasks"].items():
        for method, e in entry["summary"].items():
            pairs = entry["pairs"].get(method.removeprefix("dpo_"), {}).get("n_kept", "") if method.startswith("dpo_") else ""
            low, high = e["suffix_score_ci95"]
            lines.append(
                f"| {task} | {LABELS.get(method, method)} | {pairs} | {e['suffix_score_mean']:.4f} [{low:.4f}, {high:.4f}] | "
                f"{format_delta(e, 'suffix_score', 4)} | {format_delta(e, 'lexicon_target_rate', 3)} | "
                f"{format_delta(e, 'lexicon_opposite_rate', 3)} | {format_delta(e, 'vader_compound', 2)} | "
                f"{e.get('perplexity_mean', float('nan')):.2f} | {e['seconds_mean']:.2f} |")
    return "\n".join(lines)


def figure(result: dict[str, Any], path: Path) -> Path:
    """Paired change vs the base (95% CI) per method and task: the base's judge and the independent ones."""
    tasks = list(result["tasks"])
    methods = list(dict.fromkeys(m for t in tasks for m in result["tasks"][t]["summary"] if m != "none"))
    panels = [m for m in METRICS if m != "lexicon_opposite_rate"]
    fig, axes = plotting.figure(1, len(panels), width=3.6, height=3.6)
    colors = plotting.task_colors(methods)
    width = 0.8 / max(1, len(methods))
    for ax, metric in zip(axes[0], panels, strict=True):
        for j, method in enumerate(methods):
            xs, ys, err = [], [], [[], []]
            for i, task in enumerate(tasks):
                e = result["tasks"][task]["summary"].get(method, {})
                if f"{metric}_delta_vs_none" not in e:
                    continue
                d, (low, high) = e[f"{metric}_delta_vs_none"], e[f"{metric}_delta_ci95"]
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(d)
                err[0].append(d - low)
                err[1].append(high - d)
            if xs:
                ax.bar(xs, ys, width, yerr=err, capsize=2, color=colors[method], label=LABELS.get(method, method),
                       error_kw={"lw": 0.8})
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
        ax.set_title(f"Δ {METRICS[metric][0]} vs base", fontsize=9)
        ax.grid(False, axis="x")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8, title="method", title_fontsize=8)
    fig.suptitle(f"DPO on self-generated pairs vs steering, {plotting.model_label(result['model'])}: "
                 "paired change vs the base, 95% bootstrap intervals", fontsize=10)
    return plotting.save(fig, path)


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"### DPO on self-generated preference pairs — {result['model']}", "",
             f"Pairs from the first {s['limit']} `train` prompts per task (min gain {s['min_gain']}); DPO "
             f"{'LoRA r=' + str(s['lora']) if s['lora'] else 'full fine-tuning'}, {s['epochs']:g} epochs, lr {s['lr']:g}, "
             f"beta {s['beta']:g}; evaluated on {result['n_test']} `test` prompts per task, greedy, "
             f"{s['max_new_tokens']} new tokens. The base is method `none`. {SIGNIFICANCE_RULE}.", "",
             table(result), ""]
    for task, entry in result["tasks"].items():
        for source, p in entry["pairs"].items():
            drops = ", ".join(f"{k} {v}" for k, v in p["dropped"].items()) or "none"
            dpo = entry["dpo"].get(source)
            trained = (f"DPO: loss {dpo['first_loss']:.3f} -> {dpo['last_loss']:.3f}, reward margin on its pairs "
                       f"{dpo['final'].get('reward_margin', float('nan')):+.3f} (accuracy "
                       f"{dpo['final'].get('reward_accuracy', float('nan')):.0%}), {dpo['seconds']:.0f} s"
                       if dpo else "no DPO model (no pair kept)")
            lines.append(f"- {task}, {SOURCES[source]}: {p['n_kept']} of {p['n_prompts']} kept (dropped: {drops}); "
                         f"mean gain of kept pairs {p['mean_gain_kept'] or 0:+.4f}; {trained}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = search_config(args)
    tasks = [get_task(t.strip()) for t in args.tasks.split(",") if t.strip()]
    for task in tasks:
        available = len(task.split("train"))
        if available < args.limit:
            print(f"note: task {task.id} has {available} train prompts; --limit {args.limit} uses all of them")
    folder = out_dir(args.out)
    start = time.perf_counter()
    model = wb.load_model(args.model, device=args.device, dtype=args.dtype, progress=True)
    result: dict[str, Any] = {"model": model.model_id, "settings": vars(args), "tasks": {}}
    for task in tasks:
        entry: dict[str, Any] = {"pairs": {}, "dpo": {}}
        retrained = False
        for source in SOURCES:
            data = preference_data(model, task, "train", folder / "pairs" / source / task.id, limit=args.limit,
                                   min_gain=args.min_gain, baseline=None if source == "selfcontrol" else source,
                                   config=config, progress=True)
            print(data.summary())
            entry["pairs"][source] = {k: data.manifest[k] for k in ("n_prompts", "n_kept", "dropped", "mean_gain_kept",
                                                                  "seconds_per_prompt")}
            entry["dpo"][source], trained = dpo_model(data.out_dir, folder / "models" / source / task.id, args, data.n_kept)
            retrained |= trained
        entry["prefix"] = prefix_controller(model, task.id, folder, args, config)
        methods = ["none", "prompt", "selfcontrol"]
        if entry["prefix"] is not None and "error" not in entry["prefix"]:
            methods.append("prefix")
        methods += [f"model:{folder / 'models' / s}" for s in SOURCES if entry["dpo"][s] is not None]
        evaluation = evaluate(model, [task.id], methods, "test", folder / "evaluation" / task.id,
                              prefix=folder / "controllers", limit=args.test_limit, max_new_tokens=args.max_new_tokens,
                              seed=args.seed, selfcontrol=config, progress=True,
                              restart=retrained)  # a retrained model's earlier answers are not its answers
        entry["summary"] = {method_label(m, folder): e for m, e in evaluation.summary["tasks"][task.id].items()}
        entry["n_test"] = len({r["prompt"] for r in evaluation.records})
        result["tasks"][task.id] = entry
    result["n_test"] = min(e["n_test"] for e in result["tasks"].values())
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["threads"] = torch.get_num_threads()
    atomic_write(folder / "dpo_study.json", json.dumps(result, indent=1, default=str))
    atomic_write(folder / "dpo_study.md", markdown(result))
    figure(result, folder / "dpo_study.png")
    if args.docs_figure:
        Path(args.docs_figure).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / "dpo_study.png", args.docs_figure)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
