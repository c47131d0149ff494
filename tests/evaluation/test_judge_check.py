import dataclasses
import json

import numpy as np
import pytest

from workbench.cli import main
from workbench.errors import InputError
from workbench.evaluation.judge_check import (
    _auc_interval,
    check_task,
    judge_check,
    save_wording,
    select_from_scores,
    select_wording,
    split_pairs,
    verdict,
)
from workbench.evaluation.judges import roc_auc
from workbench.selfcontrol.search import self_control
from workbench.selfcontrol.suffix import score_responses, suffix_score
from workbench.selfcontrol.tasks import (
    TASKS_DIR,
    ContrastPair,
    Task,
    Wording,
    get_task,
    saved_wording,
    wording_path,
)


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


# ---- wording selection (issue 15, item 2) ------------------------------------------------------------------
def _planted_scores(n_wordings: int, n_pairs: int, best: int, seed: int = 0):
    """Scores where only wording ``best`` separates target from opposite; the others are noise."""
    rng = np.random.default_rng(seed)
    target = rng.normal(size=(n_wordings, n_pairs))
    opposite = rng.normal(size=(n_wordings, n_pairs))
    target[best], opposite[best] = rng.uniform(1, 2, size=n_pairs), rng.uniform(-2, -1, size=n_pairs)
    return target, opposite


def test_split_pairs_is_a_seeded_partition():
    fit, held = split_pairs(21, seed=3)
    assert len(fit) == 11 and len(held) == 10 and sorted(fit + held) == list(range(21))
    assert split_pairs(21, seed=3) == (fit, held) and split_pairs(21, seed=4) != (fit, held)
    with pytest.raises(InputError, match="at least 4"):
        split_pairs(3)


def test_selection_on_planted_scores_picks_the_separating_wording():
    wordings = [Wording(f"Q{i}?", "Answer:") for i in range(6)]
    target, opposite = _planted_scores(6, 20, best=4)
    sel = select_from_scores("t", "m", wordings, target, opposite, n_splits=50)
    assert sel.chosen == 4 and sel.wording == wordings[4]
    assert sel.fit_auc[4] == 1.0 and sel.heldout_auc[4] == 1.0 and sel.chosen_interval == (1.0, 1.0)
    assert sel.heldout_auc[0] < 0.9 and sel.default_interval[0] <= sel.heldout_auc[0] <= sel.default_interval[1]
    assert sel.helps == 1.0 and sel.mean_change > 0.1
    assert set(sel.fit_pairs).isdisjoint(sel.heldout_pairs)
    # the held-out AUC is computed on the held-out pairs only
    h = np.asarray(sel.heldout_pairs)
    assert sel.heldout_auc[0] == pytest.approx(roc_auc(target[0, h], opposite[0, h]))


def test_selection_keeps_the_own_wording_when_it_is_best_or_tied():
    wordings = [Wording(f"Q{i}?", "Answer:") for i in range(3)]
    target, opposite = _planted_scores(3, 12, best=0)
    sel = select_from_scores("t", "m", wordings, target, opposite, n_splits=20)
    assert sel.chosen == 0 and sel.helps == 0.0 and sel.mean_change == 0.0
    tied = select_from_scores("t", "m", wordings, np.ones((3, 12)), np.zeros((3, 12)), n_splits=5)
    assert tied.chosen == 0
    with pytest.raises(InputError, match="wording, pair"):
        select_from_scores("t", "m", wordings, np.ones((2, 12)), np.zeros((2, 12)))


def test_select_wording_scores_every_wording_and_question_auto_uses_the_choice(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    task = _small("angry2peaceful", 6)
    with pytest.raises(InputError, match="judge-check --select"):
        self_control(tiny, "Hi.", task, question="auto", iterations=0, max_new_tokens=4, progress=False)
    sel = select_wording(tiny, task, n_splits=10)
    assert len(sel.wordings) == len(task.wordings()) == 2 * (1 + len(task.paraphrases))
    # each wording's AUC is the judge check of the task asked that way, on the same pairs
    k = len(sel.wordings) - 1
    row = check_task(tiny, dataclasses.replace(task.with_wording(sel.wordings[k]), contrast_pairs=tuple(
        task.contrast_pairs[i] for i in sel.heldout_pairs)))
    assert sel.heldout_auc[k] == pytest.approx(row.auc)
    path = wording_path(tiny.model_id, task.id)
    assert path.is_file() and str(path).startswith(str(tmp_path))
    assert saved_wording(tiny.model_id, task) == sel.wording
    # question="auto" judges with the saved wording: its initial score is that wording's score
    result = self_control(tiny, "Hi.", task, question="auto", iterations=0, max_new_tokens=4, progress=False)
    prompt = tiny.chat_ids("Hi.")
    chosen = suffix_score(tiny, [prompt], [result.original_ids], task.with_wording(sel.wording))
    assert result.initial_score == pytest.approx(float(chosen[0]), abs=1e-6)
    # a different saved choice changes what "auto" optimises
    other = next(i for i in range(len(sel.wordings)) if sel.wordings[i].question != sel.wording.question)
    save_wording(dataclasses.replace(sel, chosen=other), task)
    again = self_control(tiny, "Hi.", task, question="auto", iterations=0, max_new_tokens=4, progress=False)
    want = suffix_score(tiny, [prompt], [again.original_ids], task.with_wording(sel.wordings[other]))
    assert again.initial_score == pytest.approx(float(want[0]), abs=1e-6)
    assert again.initial_score != pytest.approx(result.initial_score, abs=1e-7)
    # a resumable evaluation knows "auto" by the wording it resolves to: a new choice is a new fingerprint
    from workbench.evaluation.methods import SelfControlMethod

    method = SelfControlMethod({"question": "auto"})
    now = method.fingerprint(tiny, [task])["judged_as"][task.id]
    assert now["question"] == sel.wordings[other].question
    save_wording(sel, task)
    assert method.fingerprint(tiny, [task])["judged_as"][task.id]["question"] == sel.wording.question
    # an edited task must be re-selected
    edited = dataclasses.replace(task, target="No", contrast="Yes")
    with pytest.raises(InputError, match="changed since"):
        saved_wording(tiny.model_id, edited)
    with pytest.raises(InputError, match="judge-check --select"):
        saved_wording("another-model", task)


def test_cli_judge_check_select_and_control_question_auto(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    data = json.loads((TASKS_DIR / "surprised2calm.json").read_text())
    data["contrast_pairs"] = data["contrast_pairs"][:5]
    (tmp_path / "calm.json").write_text(json.dumps(data))
    args = ["--model", "tiny-random", "--task", str(tmp_path / "calm.json")]
    assert main(["control", *args, "--prompt", "Hi.", "--question", "auto", "--iterations", "0"]) == 2
    assert "judge-check --select" in capsys.readouterr().err
    assert main(["judge-check", *args, "--select", "--out", str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["tasks"][0]
    assert report["task"] == "surprised2calm" and len(report["fit_pairs"]) == 3 and len(report["heldout_pairs"]) == 2
    assert "| surprised2calm | 3 / 2 |" in (tmp_path / "out" / "wording_selection.md").read_text()
    assert main(["control", *args, "--prompt", "Hi.", "--question", "auto", "--iterations", "0", "--json",
                 "--max-new-tokens", "4"]) == 0
