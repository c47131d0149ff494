import csv
import json

import pytest

from workbench.errors import CorruptArtifactError, InputError
from workbench.evaluation.report import read_records, summarize, write_summary


def test_read_records_drops_a_torn_last_line_and_refuses_a_corrupt_middle(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "tor')
    assert read_records(path) == [{"a": 1}, {"a": 2}]
    assert path.read_text().endswith("tor")
    assert read_records(path, repair=True) == [{"a": 1}, {"a": 2}]
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3}')  # complete JSON but no newline: may be half of a longer line
    assert read_records(path, repair=True) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(CorruptArtifactError, match="corrupt line 2"):
        read_records(path)
    assert read_records(tmp_path / "none.jsonl") == []


def test_summarize_means_and_paired_change_on_known_data():
    records = []
    for i, (a, b) in enumerate([(0.1, 0.2), (0.2, 0.3), (0.3, 0.4)]):
        records.append({"task": "t", "method": "none", "prompt": f"p{i}", "suffix_score": a, "seconds": 1.0,
                        "perplexity": None, "degenerate": None})
        records.append({"task": "t", "method": "prompt", "prompt": f"p{i}", "suffix_score": b, "seconds": 2.0,
                        "perplexity": 3.0, "degenerate": "empty" if i == 0 else None})
    s = summarize(records)["t"]
    assert s["none"]["n"] == 3 and s["none"]["suffix_score_mean"] == pytest.approx(0.2)
    low, high = s["none"]["suffix_score_ci95"]
    assert 0.1 <= low < 0.2 < high <= 0.3
    assert s["prompt"]["suffix_score_delta_vs_none"] == pytest.approx(0.1)
    assert s["prompt"]["suffix_score_delta_ci95"] == pytest.approx([0.1, 0.1])  # every paired difference is 0.1
    assert s["prompt"]["seconds_delta_vs_none"] == pytest.approx(1.0)
    assert "perplexity_mean" not in s["none"] and s["prompt"]["perplexity_mean"] == 3.0
    assert "perplexity_delta_vs_none" not in s["prompt"]  # no finite baseline to pair with
    assert s["prompt"]["n_degenerate"] == 1 and "suffix_score_delta_vs_none" not in s["none"]
    assert not s["prompt"]["suffix_score_delta_significant"]  # three of three same-sign pairs: n < the minimum


def _pairs(n, change, noise=0.0, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        base = 0.3 + 0.1 * rng.random()
        records.append({"task": "t", "method": "none", "prompt": f"p{i}", "suffix_score": base})
        records.append({"task": "t", "method": "prompt", "prompt": f"p{i}",
                        "suffix_score": base + change + noise * rng.normal()})
    return records


def test_table_marks_only_changes_a_paired_test_supports_on_enough_prompts():
    """Issue 11.2: `bootstrap_ci([0.003])` gave a zero-width interval and the table printed `+0.003*`."""
    from scipy import stats

    from workbench.evaluation.judges import MIN_N_SIGNIFICANCE
    from workbench.evaluation.report import SIGNIFICANCE_RULE, markdown_table

    one = summarize(_pairs(1, 0.003))
    assert one["t"]["prompt"]["suffix_score_ci95"] is None and one["t"]["prompt"]["suffix_score_delta_ci95"] is None
    row = next(line for line in markdown_table(one).splitlines() if "| prompt |" in line)
    assert "+0.0030 |" in row and "*" not in row and "[" not in row.split("|")[4]  # no interval, no mark
    two = summarize(_pairs(2, 0.003))["t"]["prompt"]  # two same-sign pairs: an interval, but no mark
    assert two["suffix_score_delta_ci95"] is not None and not two["suffix_score_delta_significant"]
    for n in range(1, MIN_N_SIGNIFICANCE):
        assert not summarize(_pairs(n, 0.05, noise=0.001))["t"]["prompt"]["suffix_score_delta_significant"]
    for n, change, noise in [(6, 0.05, 0.001), (12, 0.05, 0.02), (12, 0.0, 0.02), (30, 0.004, 0.02), (30, 0.03, 0.02)]:
        records = _pairs(n, change, noise, seed=n)
        entry = summarize(records)["t"]["prompt"]
        diff = [b["suffix_score"] - a["suffix_score"] for a, b in zip(records[::2], records[1::2], strict=True)]
        p_t = stats.ttest_1samp(diff, 0.0).pvalue
        assert entry["suffix_score_delta_significant"] == (p_t < 0.05), (n, change, p_t)
        row = next(line for line in markdown_table({"t": {"prompt": entry}}).splitlines() if "| prompt |" in line)
        assert ("*" in row.split("|")[5]) == (p_t < 0.05)
    assert f"at least {MIN_N_SIGNIFICANCE} pairs" in SIGNIFICANCE_RULE


def test_write_summary_pools_tasks_with_paired_changes(tmp_path):
    records = []
    for task in ("a", "b"):
        for i in range(3):
            for method, score in (("none", 0.4 + 0.01 * i), ("repe", 0.45 + 0.01 * i)):
                records.append({"task": task, "method": method, "prompt": f"p{i}", "suffix_score": score,
                                "vader_compound": 0.0, "seconds": 1.0, "perplexity": 2.0, "distinct_2": 1.0,
                                "degenerate": None, "info": {}})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "config.json").write_text(json.dumps({"model_id": "m", "tasks": ["a", "b"], "methods": ["none", "repe"]}))
    summary = write_summary(tmp_path)
    assert summary["tasks"]["a"]["repe"]["n"] == 3
    assert summary["pooled"]["repe"]["n"] == 6  # same prompt text in two tasks counts twice
    assert summary["pooled"]["repe"]["suffix_score_delta_vs_none"] == pytest.approx(0.05)
    md = (tmp_path / "summary.md").read_text()
    assert "| all tasks (pooled) | repe | 6 |" in md
    assert "at least 6 pairs" in md and "paired t-test" in md  # the legend states the significance rule
    with (tmp_path / "summary.csv").open() as fh:
        assert [r["task"] for r in csv.DictReader(fh)] == ["a", "a", "b", "b", "all tasks (pooled)", "all tasks (pooled)"]




def test_a_summary_of_a_folder_with_no_evaluation_is_refused(tmp_path):
    with pytest.raises(InputError, match="holds no evaluation \\(no such folder\\)"):
        write_summary(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no evaluation \\(no results.jsonl\\)"):
        write_summary(tmp_path / "empty")
