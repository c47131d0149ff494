"""Speed of the foundation on one machine, measured side by side in one run.

    python -m analyses.speed [--model M] [--repeats 3]

Prints the cached load time, one forward over ~100 tokens, and 64-token greedy
generation through the hooked model vs HF-native ``generate`` on the same ids
(and, for reference, the bridge's own ``generate``), as ratios.
"""

from __future__ import annotations

import json
import time

import torch

import workbench as wb
from analyses.common import base_parser, out_dir, timed

PROMPT = (
    "Write a detailed paragraph about the history of the lighthouse, how its light was made, "
    "who kept it, and why ships depended on it during storms along rocky coasts at night. "
    "Mention at least three different centuries and one famous lighthouse by name, and end "
    "with a short reflection on what lighthouses mean to sailors today."
)


def main() -> None:
    parser = base_parser(__doc__, "speed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    wb.load_model(args.model, device=args.device, dtype=args.dtype, progress=True)  # make sure the cache exists
    start = time.perf_counter()
    model = wb.load_model(args.model, device=args.device, dtype=args.dtype, progress=False)
    load_s = time.perf_counter() - start
    ids = model.chat_ids(PROMPT)
    tensor = model.as_tensor(ids)
    n = args.new_tokens

    def forward():
        with torch.no_grad():
            model.bridge(tensor)

    def hooked():
        return model.generate([ids], max_new_tokens=n, stop_at_eos=False)

    def hf_native():
        with torch.no_grad():
            return model.decoder.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=n,
                                          min_new_tokens=n, do_sample=False, pad_token_id=model.pad_token_id)

    def bridge_generate():
        return model.bridge.generate(tensor, max_new_tokens=n, do_sample=False, stop_at_eos=False, verbose=False)

    same = hooked().tokens[0] == hf_native()[0, tensor.shape[1]:].tolist()
    rows = {
        "cached_load_s": load_s,
        "prompt_tokens": len(ids),
        "forward_s": timed(forward, args.repeats),
        "hooked_generate_s": timed(hooked, args.repeats),
        "hf_native_generate_s": timed(hf_native, args.repeats),
        "bridge_generate_s": timed(bridge_generate, args.repeats),
        "same_tokens_as_hf": same,
    }
    rows["hooked_over_hf_ratio"] = rows["hooked_generate_s"] / rows["hf_native_generate_s"]
    rows["bridge_generate_over_hf_ratio"] = rows["bridge_generate_s"] / rows["hf_native_generate_s"]
    print(f"model {model.model_id} on {model.device} ({model.dtype}), torch threads {torch.get_num_threads()}")
    print(f"cached load                      {load_s:6.2f} s")
    print(f"forward over {len(ids)} tokens           {rows['forward_s']:6.3f} s")
    print(f"{n}-token greedy, hooked (ours)    {rows['hooked_generate_s']:6.2f} s")
    print(f"{n}-token greedy, HF-native        {rows['hf_native_generate_s']:6.2f} s")
    print(f"{n}-token greedy, bridge.generate  {rows['bridge_generate_s']:6.2f} s")
    print(f"ratio hooked / HF-native          {rows['hooked_over_hf_ratio']:6.2f}x  (target <= 1.3x)")
    print(f"ratio bridge.generate / HF-native {rows['bridge_generate_over_hf_ratio']:6.2f}x")
    print(f"same tokens as HF-native: {same}")
    folder = out_dir(args.out)
    (folder / "speed.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
