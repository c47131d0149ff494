"""Cost of SelfControl's pieces, measured side by side in one run (ratios).

    python -m analyses.control_speed [--model M] [--prompts 3] [--repeats 3]

1. suffix-gradient capture for all layers vs one plain forward on the same ids (target <= 2.2x);
2. 40-token generation under a fixed control on all layers vs uncontrolled (target <= 1.1x);
3. the full loop per prompt at the authors' README settings (3 iterations, 5 step sizes,
   1 branch, 40 new tokens) in units of one plain 40-token generation (target <= 6x),
   with the score gain on anger prompts.
"""

from __future__ import annotations

import json
import statistics

import torch

import workbench as wb
from analyses.common import base_parser, out_dir, timed
from workbench.selfcontrol.search import self_control
from workbench.selfcontrol.suffix import score_responses, suffix_gradients
from workbench.selfcontrol.tasks import get_task


def main() -> None:
    parser = base_parser(__doc__, "control_speed")
    parser.add_argument("--task", default="angry2peaceful")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=40)
    args = parser.parse_args()
    model = wb.load_model(args.model, device=args.device, dtype=args.dtype)
    task = get_task(args.task)
    suffixes = task.compile(model)
    prompts = task.split("train")[: args.prompts]
    n = args.new_tokens

    prompt = model.chat_ids(prompts[0])
    response = model.generate([prompt], max_new_tokens=n).tokens[0]
    ids = model.as_tensor(prompt + response + list(suffixes[0].ids))

    def forward():
        with torch.no_grad():
            model.bridge(ids)

    def gradient():
        suffix_gradients(model, prompt, response, suffixes)

    control = suffix_gradients(model, prompt, response, suffixes).step(-0.002)

    def plain():
        model.generate([prompt], max_new_tokens=n, stop_at_eos=False)

    def controlled():
        with control.applied(model):
            model.generate([prompt], max_new_tokens=n, stop_at_eos=False)

    candidates = wb.Control.stack([control * (2.0**k) for k in range(5)])

    def five_candidates():
        with candidates.applied(model):
            model.generate([prompt] * 5, max_new_tokens=n, stop_at_eos=False)

    five = model.generate([prompt] * 5, max_new_tokens=n, stop_at_eos=False).tokens

    def score_five():
        score_responses(model, [prompt], five, suffixes)

    rows: dict = {"model": model.model_id, "device": str(model.device), "threads": torch.get_num_threads()}
    rows["forward_s"] = timed(forward, args.repeats)
    rows["gradient_s"] = timed(gradient, args.repeats)
    rows["plain_generate_s"] = timed(plain, args.repeats)
    rows["controlled_generate_s"] = timed(controlled, args.repeats)
    rows["five_candidates_generate_s"] = timed(five_candidates, args.repeats)
    rows["score_five_s"] = timed(score_five, args.repeats)
    loop = []
    for text in prompts:
        result = self_control(model, text, task, iterations=3, n_steps=5, branches=1, max_new_tokens=n, progress=False)
        unit = timed(lambda t=text: model.generate([model.chat_ids(t)], max_new_tokens=n, stop_at_eos=False), 1, 0)
        loop.append({"prompt": text, "seconds": result.seconds, "plain_s": unit, "ratio": result.seconds / unit,
                     "initial_score": result.initial_score, "final_score": result.score,
                     "iterations_accepted": result.iterations_accepted, "response_changed": result.response_ids != result.original_ids})
    rows["loop"] = loop
    rows["gradient_over_forward"] = rows["gradient_s"] / rows["forward_s"]
    rows["controlled_over_plain"] = rows["controlled_generate_s"] / rows["plain_generate_s"]
    rows["five_candidates_over_plain"] = rows["five_candidates_generate_s"] / rows["plain_generate_s"]
    rows["score_five_over_plain"] = rows["score_five_s"] / rows["plain_generate_s"]
    # a loop that runs every iteration generates the original once and 5 candidates per iteration
    rows["generation_floor_3_iterations"] = 1 + 3 * rows["five_candidates_over_plain"]
    rows["loop_over_plain_mean"] = statistics.mean(r["ratio"] for r in loop)
    rows["score_before_mean"] = statistics.mean(r["initial_score"] for r in loop)
    rows["score_after_mean"] = statistics.mean(r["final_score"] for r in loop)

    print(f"model {model.model_id} on {model.device}, {rows['threads']} threads; sequence of {ids.shape[1]} tokens")
    print(f"gradient (all {model.n_layers} layers) / forward : {rows['gradient_over_forward']:.2f}x  (target <= 2.2x)"
          f"   [{rows['gradient_s']:.3f} s / {rows['forward_s']:.3f} s]")
    print(f"controlled / plain {n}-token generation     : {rows['controlled_over_plain']:.2f}x  (target <= 1.1x)"
          f"   [{rows['controlled_generate_s']:.2f} s / {rows['plain_generate_s']:.2f} s]")
    print(f"5 candidates in one batch / plain generation : {rows['five_candidates_over_plain']:.2f}x"
          f"   scoring them / plain generation: {rows['score_five_over_plain']:.2f}x")
    print(f"generation alone in a 3-iteration loop      : {rows['generation_floor_3_iterations']:.1f}x  (the floor on this device)")
    for r in loop:
        print(f"  loop {r['ratio']:5.1f}x plain  score {r['initial_score']:.4f} -> {r['final_score']:.4f}  "
              f"accepted {r['iterations_accepted']}  changed {r['response_changed']}  | {r['prompt'][:50]}")
    print(f"full loop / plain generation (mean)         : {rows['loop_over_plain_mean']:.1f}x  (target <= 6x)")
    print(f"score mean {rows['score_before_mean']:.4f} -> {rows['score_after_mean']:.4f}")
    (out_dir(args.out) / "control_speed.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
