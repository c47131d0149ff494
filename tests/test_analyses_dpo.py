"""The DPO study (analyses/dpo_study.py) runs end to end on the tiny model with tiny sizes, so it cannot rot:
pairs of both kinds, DPO models, a prefix controller, the evaluation of all of them judged by the base, table and figure."""

import json

from analyses import dpo_study

TINY = ["--model", "tiny-random", "--tasks", "angry2peaceful", "--limit", "3", "--test-limit", "2", "--epochs", "1",
        "--dpo-batch-size", "2", "--lora", "2", "--lr", "1e-3", "--prefix-limit", "3", "--prefix-epochs", "2",
        "--iterations", "2", "--n-steps", "3", "--initial-step", "-0.1", "--max-new-tokens", "6"]


def test_dpo_study_writes_table_figure_and_resumes(tmp_path):
    out, figure = tmp_path / "study", tmp_path / "docs" / "dpo_study.png"
    result = dpo_study.main([*TINY, "--out", str(out), "--docs-figure", str(figure)])
    assert figure.read_bytes() == (out / "dpo_study.png").read_bytes() and figure.stat().st_size > 0
    saved = json.loads((out / "dpo_study.json").read_text())
    entry = saved["tasks"]["angry2peaceful"]
    assert saved["model"] == "tiny-random" and saved["n_test"] == 2
    for source in ("selfcontrol", "prompt"):
        pairs = entry["pairs"][source]
        assert pairs["n_prompts"] == 3 and pairs["n_kept"] + sum(pairs["dropped"].values()) == 3
        assert (entry["dpo"][source] is None) == (pairs["n_kept"] == 0)
    assert entry["dpo"]["selfcontrol"] is not None  # the search finds gains on these prompts
    methods = set(entry["summary"])
    assert {"none", "prompt", "selfcontrol", "prefix", "dpo_selfcontrol"} <= methods
    for method, e in entry["summary"].items():
        assert e["n"] == 2 and (method == "none" or "suffix_score_delta_vs_none" in e)
    table = (out / "dpo_study.md").read_text()
    assert "| angry2peaceful | DPO on SelfControl pairs |" in table and "prefix controller" in table
    # one significance rule for every table: with 2 test prompts (below its minimum n) nothing is marked
    from workbench.evaluation.report import SIGNIFICANCE_RULE

    rows = [line for line in table.splitlines() if line.startswith("| angry2peaceful")]
    assert SIGNIFICANCE_RULE in table and len(rows) >= 5 and not any("*" in line for line in rows)
    # the evaluation judged the DPO model's own answers with the base model
    records = [json.loads(line) for line in (out / "evaluation" / "angry2peaceful" / "results.jsonl").read_text().splitlines()]
    dpo = [r for r in records if r["method"].endswith("models/selfcontrol")]
    assert len(dpo) == 2 and all(r["info"]["model"].endswith("models/selfcontrol/angry2peaceful") for r in dpo)
    # a rerun redoes nothing: same pairs, same models, same evaluation
    logs = [p for p in out.rglob("*") if p.suffix in (".jsonl", ".safetensors") and p.name != "pairs.jsonl"]
    stamps = {p: p.stat().st_mtime_ns for p in logs}
    pairs = {p: p.read_bytes() for p in out.rglob("pairs.jsonl")}
    again = dpo_study.main([*TINY, "--out", str(out)])
    assert again["tasks"]["angry2peaceful"]["summary"] == result["tasks"]["angry2peaceful"]["summary"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and len(stamps) >= 6  # logs and weights untouched
    assert {p: p.read_bytes() for p in pairs} == pairs and len(pairs) == 2  # the pairs rewritten from the log, the same
    # other DPO settings: the models are trained again and their evaluation redone, not refused or reused
    changed = dpo_study.main([*TINY, "--out", str(out), "--epochs", "2"])
    assert changed["tasks"]["angry2peaceful"]["dpo"]["selfcontrol"]["settings"]["epochs"] == 2
    assert json.loads((out / "models" / "selfcontrol" / "angry2peaceful" / "dpo.json").read_text())["settings"]["epochs"] == 2
