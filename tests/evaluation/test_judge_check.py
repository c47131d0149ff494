import dataclasses
import json

import numpy as np
import pytest

from workbench.cli import main
from workbench.errors import InputError
from workbench.evaluation.judge_check import _auc_interval, check_task, judge_check, verdict
from workbench.selfcontrol.suffix import score_responses
from workbench.selfcontrol.tasks import TASKS_DIR, ContrastPair, Task, get_task


def _small(task_id: str, n: int = 4) -> Task:
    """A shipped task cut to its first n contrast pairs: the unit tests only need the mechanics."""
    task = get_task(task_id)
    return dataclasses.replace(task, contrast_pairs=task.contrast_pairs[:n])


def test_auc_interval_on_known_data():
    assert _auc_interval(np.array([0.9, 0.8, 0.7]), np.array([0.1, 0.2, 0.3])) == (1.0, 1.0)
    assert _auc_interval(np.array([0.1, 0.2, 0.3]), np.array([0.9, 0.8, 0.7])) == (0.0, 0.0)
    rng = np.random.default_rng(1)
    low, high = _auc_interval(rng.normal(size=40), rng.normal(size=40))
    assert 0.0 < low < 0.5 < high < 1.0


def test_verdict_thresholds():
    assert verdict(0.9, 0.8, 0.98) == "usable"
    assert verdict(0.8, 0.45, 0.95) == "chance"  # high AUC but too few pairs to rule out chance
    assert verdict(0.65, 0.55, 0.77) == "weak"
    assert verdict(0.52, 0.34, 0.71) == "chance"
    assert verdict(0.2, 0.07, 0.32) == "inverted"
    assert verdict(0.37, 0.27, 0.55) == "chance"


def test_check_task_scores_pairs_like_the_search_does(tiny):
    task = _small("angry2peaceful")
    row = check_task(tiny, task)
    assert row.n_pairs == len(task.contrast_pairs) == len(row.target_scores) == len(row.opposite_scores)
    pair = task.contrast_pairs[3]
    direct = score_responses(tiny, [tiny.chat_ids(pair.prompt)],
                             [tiny.encode(pair.target_response), tiny.encode(pair.opposite_response)], task)
    assert row.target_scores[3] == pytest.approx(float(direct.scores[0]), abs=1e-5)
    assert row.opposite_scores[3] == pytest.approx(float(direct.scores[1]), abs=1e-5)
    gaps = np.array(row.target_scores) - np.array(row.opposite_scores)
    assert row.mean_gap == pytest.approx(gaps.mean(), abs=1e-6)
    assert row.paired_accuracy == pytest.approx((gaps > 0).mean())
    assert 0.0 <= row.auc_low <= row.auc <= row.auc_high <= 1.0


def test_check_task_needs_two_pairs(tiny):
    one = Task(question="Is it kind?", id="one", contrast_pairs=(ContrastPair("Hi?", "Hello!", "Go away."),))
    with pytest.raises(InputError, match="at least 2"):
        check_task(tiny, one)


def test_judge_check_table_plot_and_files(tiny, tmp_path):
    result = judge_check(tiny, [_small("angry2peaceful"), _small("helpful", 3)], progress=False)
    assert [t.task for t in result.tasks] == ["angry2peaceful", "helpful"]
    table = result.table().splitlines()
    assert table[0].startswith("| task | pairs | ROC AUC") and len(table) == 4
    assert result["helpful"].n_pairs == 3
    paths = result.save(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["model_id"] == "tiny-random" and {t["task"] for t in data["tasks"]} == {"angry2peaceful", "helpful"}
    assert {"auc", "auc_low", "mean_gap", "verdict", "target_scores"} <= set(data["tasks"][0])
    assert paths["plot"].stat().st_size > 5000 and "| helpful |" in paths["markdown"].read_text()


def test_cli_judge_check(tmp_path, capsys):
    data = json.loads((TASKS_DIR / "happy2sad.json").read_text())
    data["contrast_pairs"] = data["contrast_pairs"][:3]
    (tmp_path / "sad.json").write_text(json.dumps(data))
    assert main(["judge-check", "--model", "tiny-random", "--task", str(tmp_path / "sad.json"), "--out", str(tmp_path),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"][0]["task"] == "happy2sad"
    assert (tmp_path / "judge_check.png").is_file()


@pytest.mark.embedded
def test_embedded_judge_separates_reasoning_and_inverts_happy2sad(embedded):
    """Measured on SmolLM2-135M: reasoning AUC 0.90, happy2sad 0.20 (the self-judge prefers the happy answers)."""
    result = judge_check(embedded, ["reasoning", "happy2sad"], progress=False)
    assert result["reasoning"].auc > 0.75 and result["reasoning"].mean_gap > 0
    assert result["happy2sad"].auc < 0.4 and result["happy2sad"].mean_gap < 0
