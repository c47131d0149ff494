"""The user's side of an exported prefix: plain transformers + peft, and the workbench cannot be imported.

Run as ``python peft_side.py JOB.json``; JOB holds the base model folder and a list of
``{"adapter": folder, "prompts": [[ids...], ...], "max_new_tokens": N}``. Prints, per job, the new
tokens of each prompt (cut at the first end-of-sequence token), as JSON.
"""

import json
import sys

sys.modules["workbench"] = None  # any `import workbench` below (or inside a library) now raises ImportError

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def main(job_path: str) -> None:
    job = json.loads(open(job_path).read())
    tokenizer = AutoTokenizer.from_pretrained(job["base"])
    base = AutoModelForCausalLM.from_pretrained(job["base"], dtype=torch.float32)
    results = []
    for item in job["runs"]:
        # prompt learning leaves the base model's modules as they are, so one base serves every adapter
        model = PeftModel.from_pretrained(base, item["adapter"]).eval()
        batch = tokenizer.pad({"input_ids": item["prompts"]}, padding_side="left", return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=item["max_new_tokens"], do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        eos = base.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or [])
        rows = []
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            rows.append(row[:cut])
        results.append(rows)
    assert sys.modules["workbench"] is None and not any(m.startswith("workbench.") for m in sys.modules)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
