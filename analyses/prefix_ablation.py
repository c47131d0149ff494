"""Prefix Controller ablations: which layers the loss targets, how many virtual tokens, which suffix wording.

    python -m analyses.prefix_ablation [--task angry2peaceful] [--limit 8] [--eval-limit 4] [--threads N]

One synthesis per wording (the task's question, and its first paraphrase via
``dataclasses.replace(task, question=...)``), both resumable. Each variant
reports the held-out hidden-state MSE (at all layers, and at the layers it was
trained on) against the no-prefix baseline, and the held-out suffix score:
greedy answers with the prefix to the task's ``test`` prompts, scored by the
clean model with the task's own question. Defaults are small (CPU-sized).
Writes ``prefix_ablation.json`` and ``prefix_ablation.md`` into ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics

import torch

import workbench as wb
from analyses.common import base_parser, out_dir
from workbench.prefix.controller import PrefixController
from workbench.prefix.synthesis import load_records, synthesize
from workbench.prefix.training import evaluate_errors, train_prefix
from workbench.selfcontrol.search import SelfControlConfig
from workbench.selfcontrol.suffix import score_responses
from workbench.selfcontrol.tasks import get_task


def windows(n_layers: int) -> dict[str, list[int] | None]:
    third = max(1, n_layers // 3)
    return {"all": None, "early": list(range(third)), "middle": list(range(third, 2 * third)),
            "late": list(range(n_layers - third, n_layers))}


def suffix_score(model, task, controller: PrefixController | None, prompts: list[list[int]], max_new_tokens: int) -> float:
    if controller is None:
        responses = model.generate(prompts, max_new_tokens=max_new_tokens).tokens
    else:
        with controller.applied(model):
            responses = model.generate(prompts, max_new_tokens=max_new_tokens).tokens
    return float(score_responses(model, prompts, responses, task).scores.mean())


def main() -> None:
    parser = base_parser(__doc__, "prefix_ablation")
    parser.add_argument("--task", default="angry2peaceful")
    parser.add_argument("--limit", type=int, default=8, help="train prompts synthesised per wording")
    parser.add_argument("--eval-limit", type=int, default=4, help="test prompts for the held-out suffix score")
    parser.add_argument("--n-tokens", type=int, default=2, help="virtual tokens for the layer and wording ablations")
    parser.add_argument("--token-counts", default="1,2,5", help="virtual-token counts to compare")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--iterations", type=int, default=2, help="SelfControl iterations per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--keep-no-gain", action="store_true", help="also train on records whose score did not improve")
    parser.add_argument("--loss", choices=["mse", "relative"], default="mse")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = out_dir(args.out)
    model = wb.load_model(args.model, device=args.device, dtype=args.dtype, progress=True)
    task = get_task(args.task)
    if not task.paraphrases:
        raise SystemExit(f"task {task.id} has no paraphrases to ablate the wording with")
    config = SelfControlConfig(iterations=args.iterations, max_new_tokens=args.max_new_tokens)
    wordings = {"question": task, "paraphrase": dataclasses.replace(task, question=task.paraphrases[0])}
    data = {name: synthesize(model, t, "train", folder / f"data_{name}", limit=args.limit, config=config)
            for name, t in wordings.items()}
    eval_prompts = [model.chat_ids(p) for p in task.split("test")[: args.eval_limit]]
    common = dict(epochs=args.epochs, lr=args.lr, batch_size=8, val_fraction=0.25, require_gain=not args.keep_no_gain,
                  loss=args.loss, progress=True)

    variants = [("layers", name, "question", args.n_tokens, layers) for name, layers in windows(model.n_layers).items()]
    variants += [("tokens", str(n), "question", n, None) for n in (int(x) for x in args.token_counts.split(","))
                 if n != args.n_tokens]
    variants += [("wording", "paraphrase", "paraphrase", args.n_tokens, None)]
    records = {name: load_records(path, model)[1] for name, path in data.items()}
    rows = [{"ablation": "none", "variant": "no prefix", "wording": "-", "n_tokens": 0, "layers": "-",
             "suffix_score": suffix_score(model, task, None, eval_prompts, args.max_new_tokens)}]
    for ablation, variant, wording, n_tokens, layers in variants:
        print(f"== {ablation}: {variant}")
        controller, report = train_prefix(model, data[wording], n_tokens=n_tokens, layers=layers,
                                          records=records[wording], **common)
        val = [r for r in records[wording] if r.key in report.val_keys]
        row = {"ablation": ablation, "variant": variant, "wording": wording, "n_tokens": n_tokens,
               "layers": "all" if layers is None else f"{layers[0]}-{layers[-1]}",
               "n_train": report.n_train, "n_val": report.n_val, "filtered": report.filtered,
               "val_mse_trained_layers": report.best_val_mse, "baseline_mse_trained_layers": report.baseline_val_mse,
               **{f"{k}_all_layers": v for k, v in evaluate_errors(model, controller, val).items()},
               **{f"baseline_{k}_all_layers": v for k, v in evaluate_errors(model, None, val).items()},
               "suffix_score": suffix_score(model, task, controller, eval_prompts, args.max_new_tokens),
               "best_epoch": report.best_epoch, "train_seconds": report.seconds}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "filtered"}))
        if ablation == "layers" and variant == "all":  # the default controller doubles as the token/wording reference
            rows.append({**row, "ablation": "tokens", "variant": str(n_tokens)})
            rows.append({**row, "ablation": "wording", "variant": "question"})
    order = ["none", "layers", "tokens", "wording"]
    rows.sort(key=lambda r: order.index(r["ablation"]))  # stable: variants keep their order within a group
    gains = {w: statistics.mean(r.gain for r in recs) for w, recs in records.items()}
    result = {"model": model.model_id, "task": task.id, "settings": vars(args), "mean_synthesis_gain": gains,
              "paraphrase": task.paraphrases[0], "rows": rows}
    (folder / "prefix_ablation.json").write_text(json.dumps(result, indent=2))
    lines = [f"### Prefix ablations on {model.model_id} — task `{task.id}`", "",
             f"{args.limit} train prompts per wording (mean SelfControl gain: "
             + ", ".join(f"{k} {v:+.4f}" for k, v in gains.items()) + f"); held-out suffix score on {len(eval_prompts)} "
             f"test prompts with the task's question. Paraphrase: \"{task.paraphrases[0]}\"", "",
             "| ablation | variant | tokens | loss layers | held-out MSE, trained layers (no prefix) | "
             "held-out MSE, all layers (no prefix) | held-out relative error, all layers (no prefix) | "
             "held-out suffix score |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["ablation"] == "none":
            lines.append(f"| - | no prefix | 0 | - | - | - | - | {r['suffix_score']:.4f} |")
            continue
        lines.append(f"| {r['ablation']} | {r['variant']} | {r['n_tokens']} | {r['layers']} | "
                     f"{r['val_mse_trained_layers']:.4g} ({r['baseline_mse_trained_layers']:.4g}) | "
                     f"{r['mse_all_layers']:.4g} ({r['baseline_mse_all_layers']:.4g}) | "
                     f"{r['relative_all_layers']:.4f} ({r['baseline_relative_all_layers']:.4f}) | {r['suffix_score']:.4f} |")
    (folder / "prefix_ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
