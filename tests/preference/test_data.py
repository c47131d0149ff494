"""Preference data from SelfControl (and from instructed prompting) on the tiny model: TRL-loadable,
every dropped prompt counted by its reason, and resumable like every long run."""

import dataclasses
import json

import pytest
from sigkill import killed

from workbench.errors import InputError, ResumeMismatchError
from workbench.preference import data as pdata
from workbench.preference.data import KEPT, LOG, MANIFEST, preference_data, verdict
from workbench.preference.pairs import PAIRS_FILE, read_pairs
from workbench.selfcontrol.search import SelfControlConfig
from workbench.selfcontrol.tasks import get_task

# a generous fluency margin: the random model's answers are all equally (dis)fluent
FAST = SelfControlConfig(iterations=2, n_steps=3, initial_step=-0.1, max_new_tokens=6,
                         fluency_margin=5.0, progress=False)
TASK = "angry2peaceful"


def _log(folder):
    return [json.loads(line) for line in (folder / LOG).read_text().splitlines()]


def _consistent(folder):
    """pairs.jsonl holds exactly the kept prompts of the log; the manifest counts every prompt once."""
    log, manifest = _log(folder), json.loads((folder / MANIFEST).read_text())
    kept = [r for r in log if r["status"] == KEPT]
    rows = read_pairs(folder) if kept else []
    assert (folder / PAIRS_FILE).is_file()
    assert [r["key"] for r in rows] == [r["key"] for r in sorted(kept, key=lambda r: r["index"])]
    assert manifest["n_kept"] + sum(manifest["dropped"].values()) == manifest["n_prompts"] == len(log)
    return log, manifest, rows


@pytest.fixture(scope="module")
def made(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("pref") / "data"
    return preference_data(tiny, TASK, "train", out, limit=6, config=FAST, progress=False)


def test_rows_load_with_datasets_as_trl_conversational_preference_data(made, tiny, tmp_path):
    from datasets import load_dataset
    from trl.data_utils import is_conversational

    log, manifest, rows = _consistent(made.out_dir)
    assert manifest["mode"] == "selfcontrol" and manifest["n_kept"] >= 1, manifest
    ds = load_dataset("json", data_files=str(made.out_dir / PAIRS_FILE), split="train", cache_dir=str(tmp_path / "c"))
    assert ds.num_rows == manifest["n_kept"] and all(is_conversational(ds[i]) for i in range(ds.num_rows))
    prompts = get_task(TASK).split("train")
    for row in ds:
        record = next(r for r in log if r["key"] == row["key"])
        assert row["prompt"] == [{"role": "user", "content": prompts[record["index"]]}]
        assert row["chosen"][0]["content"] == record["chosen"] != record["rejected"] == row["rejected"][0]["content"]
        assert row["gain"] == pytest.approx(row["chosen_score"] - row["rejected_score"]) and row["gain"] > 0
        assert row["chosen_nll"] <= row["rejected_nll"] + FAST.fluency_margin
    # the rejected answer is the model's own plain greedy answer
    first = next(r for r in log if r["status"] == KEPT)
    plain = tiny.generate([tiny.chat_ids(first["prompt"])], max_new_tokens=FAST.max_new_tokens).tokens[0]
    assert tiny.decode(plain) == first["rejected"]


def test_every_dropped_prompt_is_counted_by_its_reason(tiny, tmp_path):
    out = preference_data(tiny, TASK, "train", tmp_path / "d", limit=6, config=FAST, min_gain=1.0, progress=False)
    log, manifest, rows = _consistent(out.out_dir)
    assert rows == [] and manifest["n_kept"] == 0  # no suffix score moves by a whole 1.0
    expected = {}
    for r in log:
        reason = "same answer" if r["chosen"].strip() == r["rejected"].strip() else (
            "no gain" if r["gain"] <= 0 else "gain below min-gain")
        if r["status"].split(":")[0] in ("degenerate", "disfluent"):
            reason = r["status"].split(":")[0]
        expected[reason] = expected.get(reason, 0) + 1
    assert manifest["dropped"] == dict(sorted(expected.items(), key=lambda kv: (-kv[1], kv[0])))
    assert "gain below min-gain" in manifest["dropped"]  # the search did find gains, just not that big
    assert "dropped: " in out.summary() and "gain below min-gain" in out.summary()


def test_verdict_names_the_first_reason_that_applies():
    cfg = SelfControlConfig(fluency_margin=0.5, fluency_guard=False)  # the data's guard applies even when the search's is off
    fluent = list(range(20))
    assert verdict("Calm.", "Calm. ", fluent, 0.1, 1.0, 1.0, cfg, 0.0) == "same answer"
    assert verdict("a", "b", [7] * 20, 0.1, 1.0, 1.0, cfg, 0.0).startswith("degenerate:")
    assert verdict("a", "b", fluent, 0.1, 1.6, 1.0, cfg, 0.0).startswith("disfluent:")
    assert verdict("a", "b", fluent, 0.0, 1.4, 1.0, cfg, 0.0) == "no gain"
    assert verdict("a", "b", fluent, 0.01, 1.0, 1.0, cfg, 0.02) == "gain below min-gain"
    assert verdict("a", "b", fluent, 0.02, 1.0, 1.0, cfg, 0.02) == KEPT


def test_a_rerun_skips_finished_prompts_and_extends_to_a_larger_limit(made, tiny, tmp_path, monkeypatch):
    searched = []
    real = pdata.controlled_answers

    def counting(model, prompts, task, config):
        searched.extend(prompts)
        return real(model, prompts, task, config)

    monkeypatch.setattr(pdata, "controlled_answers", counting)
    before = (made.out_dir / LOG).read_text()
    again = preference_data(tiny, TASK, "train", made.out_dir, limit=6, config=FAST, progress=False)
    assert searched == [] and (made.out_dir / LOG).read_text() == before and again.manifest["n_prompts"] == 6
    out = tmp_path / "copy"
    out.mkdir()
    for name in (LOG, "run.json"):
        (out / name).write_bytes((made.out_dir / name).read_bytes())
    more = preference_data(tiny, TASK, "train", out, limit=8, config=FAST, progress=False)
    assert searched == get_task(TASK).split("train")[6:8]
    assert (out / LOG).read_text().startswith(before) and more.manifest["n_prompts"] == 8
    _consistent(out)


def test_other_settings_are_refused_unless_restarted(made, tiny, tmp_path):
    with pytest.raises(ResumeMismatchError, match="min_gain"):
        preference_data(tiny, TASK, "train", made.out_dir, limit=6, config=FAST, min_gain=0.5, progress=False)
    with pytest.raises(ResumeMismatchError, match="search"):
        preference_data(tiny, TASK, "train", made.out_dir, limit=6, config=SelfControlConfig(iterations=1), progress=False)
    out = tmp_path / "r"
    preference_data(tiny, TASK, "train", out, limit=1, config=FAST, progress=False)
    redone = preference_data(tiny, TASK, "train", out, limit=1, config=FAST, min_gain=1.0, restart=True, progress=False)
    assert redone.manifest["min_gain"] == 1.0 and len(_log(out)) == 1 and redone.n_kept == 0


def test_baseline_prompt_writes_the_instructed_answer_as_chosen(tiny, tmp_path):
    task = get_task(TASK)
    out = preference_data(tiny, task, "train", tmp_path / "b", limit=2, config=FAST, baseline="prompt",
                          progress=False)
    log, manifest, _ = _consistent(out.out_dir)
    assert manifest["mode"] == "prompt" and manifest["prompt_style"] == "user"
    for r in log:
        user, system = task.instructed(r["prompt"])
        assert user.startswith(task.instruction) and system is None
        instructed = tiny.generate([tiny.chat_ids(user)], max_new_tokens=FAST.max_new_tokens).tokens[0]
        plain = tiny.generate([tiny.chat_ids(r["prompt"])], max_new_tokens=FAST.max_new_tokens).tokens[0]
        assert (r["chosen"], r["rejected"]) == (tiny.decode(instructed), tiny.decode(plain))
        assert "iterations_run" not in r  # no search ran


def test_bad_requests_are_refused_before_any_work(tiny, tmp_path):
    no_instruction = dataclasses.replace(get_task(TASK), instruction="")
    with pytest.raises(InputError, match="instruction"):
        preference_data(tiny, no_instruction, "train", tmp_path / "x", baseline="prompt", progress=False)
    with pytest.raises(InputError, match="baseline"):
        preference_data(tiny, TASK, "train", tmp_path / "x", baseline="repe", progress=False)
    with pytest.raises(InputError, match="min_gain"):
        preference_data(tiny, TASK, "train", tmp_path / "x", min_gain=-1, progress=False)
    assert not (tmp_path / "x").exists()


# the second prompt's line is on disk, its pairs and the manifest not yet: SIGKILL then
KILLED_RUN = """
import sys
import workbench as wb
from workbench.preference import data
from workbench.selfcontrol.search import SelfControlConfig
model = wb.load_model("tiny-random", progress=False)
data.preference_data(model, "angry2peaceful", "train", sys.argv[1], limit=int(sys.argv[2]), progress=False, batch_size=1,
                     config=SelfControlConfig(iterations=2, n_steps=3, initial_step=-0.1,
                                              max_new_tokens=6, fluency_margin=5.0))
"""


def test_a_killed_run_resumes_where_it_stopped(made, tiny, tmp_path):
    out = tmp_path / "killed"
    killed(KILLED_RUN, out, 4, at="workbench.preference.data.append_jsonl", call=2)
    log = _log(out)
    assert [r["index"] for r in log] == [0, 1]
    assert json.loads((out / MANIFEST).read_text())["n_prompts"] == 1  # written after the first prompt only
    resumed = preference_data(tiny, TASK, "train", out, limit=4, config=FAST, progress=False)
    final, manifest, _ = _consistent(out)
    assert final[:2] == log and [r["index"] for r in final] == [0, 1, 2, 3]
    # the same run as one without the kill
    reference = {r["key"]: (r["status"], r["chosen"], r["rejected"]) for r in made.records}
    assert {r["key"]: (r["status"], r["chosen"], r["rejected"]) for r in final} == {
        k: v for k, v in reference.items() if k in {r["key"] for r in final}}
    assert resumed.manifest["n_prompts"] == 4
