import csv
import json

import pytest

from workbench.cli import main
from workbench.errors import InputError, ResumeMismatchError, RunLockedError
from workbench.evaluation.methods import Decoding, Method, NoControl
from workbench.evaluation.report import write_summary
from workbench.evaluation.runner import evaluate, evaluate_from_config, resolve_prompts
from workbench.selfcontrol.tasks import get_task

TASK = get_task("angry2peaceful")
PROMPTS = TASK.split("test")[:2]
FAST = {"max_new_tokens": 4, "progress": False}


def _lines(folder):
    return (folder / "results.jsonl").read_text().splitlines()


def _keys(records):
    return [(r["task"], r["method"], r["prompt"]) for r in records]


# ---------------------------------------------------------------- prompts
def test_resolve_prompts_from_split_list_dict_and_file(tmp_path):
    tasks = [TASK, get_task("helpful")]
    assert resolve_prompts(tasks, "test") == {t.id: t.split("test") for t in tasks}
    assert resolve_prompts(tasks, "test", limit=2)["helpful"] == get_task("helpful").split("test")[:2]
    assert resolve_prompts(tasks, ["a?", "b?"]) == {"angry2peaceful": ["a?", "b?"], "helpful": ["a?", "b?"]}
    mapping = {"angry2peaceful": ["x?"], "helpful": ["y?", "z?"]}
    (tmp_path / "p.json").write_text(json.dumps(mapping))
    (tmp_path / "l.json").write_text(json.dumps(["q?"]))
    assert resolve_prompts(tasks, str(tmp_path / "p.json")) == mapping
    assert resolve_prompts(tasks, tmp_path / "l.json") == {"angry2peaceful": ["q?"], "helpful": ["q?"]}
    with pytest.raises(InputError, match="no prompts for task"):
        resolve_prompts(tasks, {"helpful": ["y?"]})
    with pytest.raises(InputError, match="no split"):
        resolve_prompts(tasks, "validation")
    with pytest.raises(InputError, match="duplicates"):
        resolve_prompts(tasks, ["a?", "a?"])
    with pytest.raises(InputError, match="cannot read"):
        resolve_prompts(tasks, str(tmp_path / "missing.json"))
    with pytest.raises(InputError, match="non-empty"):
        resolve_prompts(tasks, [""])


@pytest.mark.parametrize(("content", "message"), [
    ({"angry2peaceful": "Why?"}, "field 'angry2peaceful' should be a list, got str 'Why?'"),
    ("Why?", "must hold a list of prompts or an object"),
    ({"angry2peaceful": ["Why?", 3]}, "field 'angry2peaceful[1]' should be a string, got int 3"),
    ({"angry2peaceful": []}, "field 'angry2peaceful' should be non-empty"),
    ([["Why?"]], "field '[0]' should be a string"),
    (7, "must hold a list of prompts or an object"),
])
def test_a_bad_prompts_file_names_the_file_and_the_task(tmp_path, content, message):
    """``{"angry2peaceful": "Why?"}`` was evaluated as the four prompts 'W', 'h', 'y', '?'."""
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(content))
    with pytest.raises(InputError) as caught:
        resolve_prompts([TASK], str(path))
    assert f"prompts file {path}" in str(caught.value) and message in str(caught.value)
    with pytest.raises(InputError, match="should be a list"):
        resolve_prompts([TASK], {"angry2peaceful": "Why?"})  # the same schema for a Python dict


# ---------------------------------------------------------------- results file


# ---------------------------------------------------------------- summary on known data


# ---------------------------------------------------------------- the runner
def test_run_writes_every_output_and_resumes_after_a_torn_line(tiny, tmp_path):
    out = tmp_path / "run"
    first = evaluate(tiny, [TASK], "none,prompt", PROMPTS, out, **FAST)
    lines = _lines(out)
    assert len(lines) == 4 and len(set(_keys(first.records))) == 4
    record = json.loads(lines[0])
    assert set(record) >= {"task", "method", "prompt", "prompt_index", "response", "response_ids", "seconds",
                           "suffix_score", "nll", "perplexity", "vader_compound", "lexicon_target_rate",
                           "lexicon_opposite_rate", "distinct_2", "degenerate", "n_tokens", "info"}
    assert 0 < record["suffix_score"] < 1 and record["perplexity"] > 1

    # output formats
    summary = json.loads((out / "summary.json").read_text())
    for method in ("none", "prompt"):
        entry = summary["tasks"]["angry2peaceful"][method]
        for key in ("n", "suffix_score_mean", "lexicon_target_rate_mean", "vader_compound_mean", "perplexity_mean",
                    "seconds_mean", "suffix_score_ci95", "distinct_2_mean"):
            assert key in entry, key
        assert entry["n"] == 2
    assert "suffix_score_delta_vs_none" in summary["tasks"]["angry2peaceful"]["prompt"]
    with (out / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["task"], r["method"]) for r in rows] == [("angry2peaceful", "none"), ("angry2peaceful", "prompt")]
    assert {"suffix_score_mean", "suffix_score_ci_low", "vader_compound_delta_vs_none"} <= set(rows[0])
    md = (out / "summary.md").read_text()
    assert "| angry2peaceful | prompt | 2 |" in md and "NRC target rate" in md
    assert (out / "summary.png").stat().st_size > 5000
    config = json.loads((out / "config.json").read_text())
    assert config["prompts"] == {"angry2peaceful": PROMPTS} and config["decoding"]["max_new_tokens"] == 4
    assert config["methods"] == ["none", "prompt"] and config["command"].endswith("config.json")

    # a kill mid-write: keep one line and half of the next; the rerun redoes exactly the missing three
    (out / "results.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    second = evaluate(tiny, [TASK], "none,prompt", PROMPTS, out, **FAST)
    again = _lines(out)
    assert again[0] == lines[0] and len(again) == 4
    assert sorted(_keys(json.loads(x) for x in again)) == sorted(_keys(first.records))
    assert [json.loads(x)["response_ids"] for x in again] == [json.loads(x)["response_ids"] for x in lines]
    assert len(second.records) == 4

    # a rerun from config.json has nothing left to do
    third = evaluate_from_config(out / "config.json", model=tiny, progress=False)
    assert _lines(out) == again and len(third.records) == 4


class _Interrupting(Method):
    name = "flaky"

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = 0, fail_at

    def respond(self, model, task, prompt, decoding):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return NoControl().respond(model, task, prompt, decoding)


def test_an_interrupted_run_keeps_finished_lines_and_completes_without_duplicates(tiny, tmp_path):
    prompts = ["Hi there?", "How are you?", "Why?"]
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny, [TASK], [NoControl(), _Interrupting(fail_at=2)], prompts, tmp_path, **FAST)
    assert len(_lines(tmp_path)) == 3  # prompt 1: none + flaky; prompt 2: none, then the kill
    result = evaluate(tiny, [TASK], [NoControl(), _Interrupting()], prompts, tmp_path, **FAST)
    keys = _keys(json.loads(x) for x in _lines(tmp_path))
    assert len(keys) == len(set(keys)) == 6 and len(result.records) == 6


def test_resume_refuses_other_settings_and_a_smaller_run_never_shrinks_the_folder(tiny, tmp_path):
    evaluate(tiny, [TASK], "none", PROMPTS, tmp_path, **FAST)
    with pytest.raises(ResumeMismatchError, match="decoding.max_new_tokens: 4 stored vs 5 now"):
        evaluate(tiny, [TASK], "none", PROMPTS, tmp_path, max_new_tokens=5, progress=False)
    result = evaluate(tiny, [TASK], "none", PROMPTS[:1], tmp_path, **FAST)  # the first prompts of the same list
    assert len(_lines(tmp_path)) == 2 and len(result.records) == 1
    assert json.loads((tmp_path / "config.json").read_text())["prompts"] == {TASK.id: PROMPTS}  # not shrunk
    assert write_summary(tmp_path)["tasks"]["angry2peaceful"]["none"]["n"] == 2
    with pytest.raises(ResumeMismatchError, match=r"prompts.angry2peaceful#0: .* stored vs 'Other\?' now"):
        evaluate(tiny, [TASK], "none", ["Other?"], tmp_path, **FAST)  # another prompt set into the same folder


class _Knobs(NoControl):
    name = "knobs"

    def __init__(self, **knobs):
        self.knobs = knobs

    def settings(self):
        return self.knobs


def test_issue_reproduction_fewer_methods_then_other_method_settings_is_refused(tiny, tmp_path):
    """Issue 11.1: none,prompt(style=user), then none, then none,prompt(style=system) reported the user-style
    records as system-style: the middle run shrank config.json to `none` and the check compared only shared methods."""
    user = evaluate(tiny, [TASK], "none,prompt", PROMPTS[:1], tmp_path, prompt_style="user", **FAST)
    user_records = [r for r in user.records if r["method"] == "prompt"]
    evaluate(tiny, [TASK], "none", PROMPTS[:1], tmp_path, **FAST)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["methods"] == ["none", "prompt"] and config["method_settings"]["prompt"] == {"style": "user"}
    with pytest.raises(ResumeMismatchError) as caught:
        evaluate(tiny, [TASK], "none,prompt", PROMPTS[:1], tmp_path, prompt_style="system", **FAST)
    text = str(caught.value)
    assert "methods.prompt.style: 'user' stored vs 'system' now" in text
    assert "another --out" in text and "--restart" in text
    assert [json.loads(x) for x in _lines(tmp_path) if json.loads(x)["method"] == "prompt"] == user_records
    # the way out: --restart discards the old results and runs the new settings
    system = evaluate(tiny, [TASK], "none,prompt", PROMPTS[:1], tmp_path, prompt_style="system", restart=True, **FAST)
    assert [r["info"]["style"] for r in system.records if r["method"] == "prompt"] == ["system"]
    assert len(_lines(tmp_path)) == 2


def test_resume_compares_every_knob_of_every_method_and_adding_a_method_extends(tiny, tmp_path):
    evaluate(tiny, [TASK], [_Knobs(a=1, layers=(1, 2))], PROMPTS[:1], tmp_path, **FAST)
    with pytest.raises(ResumeMismatchError, match="methods.knobs.a: 1 stored vs 2 now"):
        evaluate(tiny, [TASK], [_Knobs(a=2, layers=(1, 2))], PROMPTS[:1], tmp_path, **FAST)
    with pytest.raises(ResumeMismatchError, match=r"methods.knobs.layers: \[1, 2\] stored vs \[1, 3\] now"):
        evaluate(tiny, [TASK], [NoControl(), _Knobs(a=1, layers=(1, 3))], PROMPTS[:1], tmp_path, **FAST)
    with pytest.raises(ResumeMismatchError, match=r"methods.knobs.b: \(absent\) stored vs 0 now"):
        evaluate(tiny, [TASK], [_Knobs(a=1, layers=(1, 2), b=0)], PROMPTS[:1], tmp_path, **FAST)
    # tuples match saved lists; a method added extends the run, and a later run without it keeps it
    result = evaluate(tiny, [TASK], [NoControl(), _Knobs(a=1, layers=(1, 2))], PROMPTS[:1], tmp_path, **FAST)
    assert sorted(_keys(result.records)) == [(TASK.id, "knobs", PROMPTS[0]), (TASK.id, "none", PROMPTS[0])]
    evaluate(tiny, [TASK], [NoControl()], PROMPTS[:1], tmp_path, **FAST)
    stored = json.loads((tmp_path / "run.json").read_text())["fingerprint"]["methods"]
    assert stored == {"knobs": {"a": 1, "layers": [1, 2]}, "none": {}}


def test_resume_refuses_another_model_dtype_or_task_text(tiny, tiny_mha, tmp_path):
    import dataclasses

    import torch

    import workbench as wb

    evaluate(tiny, [TASK], "none", PROMPTS[:1], tmp_path, **FAST)
    with pytest.raises(ResumeMismatchError, match="model.model_id: 'tiny-random' stored vs 'tiny-random-mha' now"):
        evaluate(tiny_mha, [TASK], "none", PROMPTS[:1], tmp_path, **FAST)
    half = wb.load_model("tiny-random", dtype=torch.bfloat16, progress=False)
    with pytest.raises(ResumeMismatchError, match="model.dtype: 'float32' stored vs 'bfloat16' now") as caught:
        evaluate(half, [TASK], "none", PROMPTS[:1], tmp_path, **FAST)
    assert "model.weights" in str(caught.value)  # bf16 weights differ from the float32 ones
    reworded = dataclasses.replace(TASK, question="Is the reply calm?")
    with pytest.raises(ResumeMismatchError, match="tasks.angry2peaceful.question: .* stored vs 'Is the reply calm\\?' now"):
        evaluate(tiny, [reworded], "none", PROMPTS[:1], tmp_path, **FAST)


def test_resume_knows_a_prefix_controller_by_content_not_path(tiny, tmp_path):
    from workbench.prefix.controller import PrefixController

    controller = PrefixController.init(tiny, n_tokens=2)
    controller.save(tmp_path / "ctrl")
    evaluate(tiny, [TASK], "prefix", PROMPTS[:1], tmp_path / "run", prefix=tmp_path / "ctrl", **FAST)
    controller.save(tmp_path / "moved")
    evaluate(tiny, [TASK], "prefix", PROMPTS[:1], tmp_path / "run", prefix=tmp_path / "moved", **FAST)  # same content
    controller.embeddings = controller.embeddings + 0.5
    controller.save(tmp_path / "ctrl")  # retrained in place: same path, other content
    with pytest.raises(ResumeMismatchError, match="methods.prefix.controllers.angry2peaceful"):
        evaluate(tiny, [TASK], "prefix", PROMPTS[:1], tmp_path / "run", prefix=tmp_path / "ctrl", **FAST)


def test_repe_refuses_a_coefficient_chosen_on_the_evaluated_prompts(tiny, tmp_path):
    """A saved coefficient was reused unchecked, so `--prompts train` evaluated on the prompts it was tuned on."""
    from workbench.evaluation.methods import RepeAddition

    method = RepeAddition(coefficients=(0.0, 0.1), n_select=2, n_pairs=4)
    state = method.prepare(tiny, TASK, Decoding(max_new_tokens=3), held_out=PROMPTS)
    tuned_on = state["selection_prompts"]
    with pytest.raises(InputError, match="chosen on prompts that are now evaluated"):
        RepeAddition(coefficients=(0.0, 0.1), n_select=2, n_pairs=4).prepare(
            tiny, TASK, Decoding(max_new_tokens=3), held_out=tuned_on, state=state)


def test_results_without_a_fingerprint_are_refused_and_a_second_writer_too(tiny, tmp_path):
    from workbench.store import folder_lock

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.jsonl").write_text('{"task": "angry2peaceful"}\n')  # an older workbench's run
    with pytest.raises(ResumeMismatchError, match="no run.json"):
        evaluate(tiny, [TASK], "none", PROMPTS[:1], tmp_path / "old", **FAST)
    with folder_lock(tmp_path / "busy"), pytest.raises(RunLockedError):
        evaluate(tiny, [TASK], "none", PROMPTS[:1], tmp_path / "busy", **FAST)


def test_non_emotion_task_has_no_lexicon_metric(tiny, tmp_path):
    result = evaluate(tiny, "helpful", "none", ["Say hi?"], tmp_path, **FAST)
    entry = result.summary["tasks"]["helpful"]["none"]
    assert "lexicon_target_rate_mean" not in entry and "vader_compound_mean" in entry


def test_cli_evaluate_and_summary_only(tmp_path, capsys):
    (tmp_path / "p.json").write_text(json.dumps(["Hello?"]))
    args = ["--model", "tiny-random", "--tasks", "angry2peaceful", "--methods", "none,prompt",
            "--prompts", str(tmp_path / "p.json"), "--out", str(tmp_path / "o"), "--max-new-tokens", "3", "--json"]
    assert main(["evaluate", *args]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tasks"]["angry2peaceful"]["prompt"]["n"] == 1
    assert main(["evaluate", "--out", str(tmp_path / "o"), "--summary-only"]) == 0
    assert "| angry2peaceful | none | 1 |" in capsys.readouterr().out
    assert main(["evaluate", "--model", "tiny-random", "--methods", "prefix", "--out", str(tmp_path / "x")]) == 2
    capsys.readouterr()
    other = [a if a != "3" else "4" for a in args]
    assert main(["evaluate", *other]) == 2  # another decoding into the same folder: refused, naming the key
    assert "error:" in (err := capsys.readouterr().err) and "decoding.max_new_tokens: 3 stored vs 4 now" in err
    assert main(["evaluate", *other, "--restart"]) == 0
    assert json.loads((tmp_path / "o" / "run.json").read_text())["fingerprint"]["decoding"]["max_new_tokens"] == 4




KILLED_RUN = """
import os, signal, sys
import workbench as wb
from workbench.evaluation import runner
from workbench.store import append_jsonl
calls = []
def append_then_die(path, record):  # the third record: half of its line reaches the disk, then SIGKILL
    calls.append(1)
    if len(calls) == 3:
        line = (__import__("json").dumps(record) + "\\n").encode()
        with open(path, "ab") as fh:
            fh.write(line[: len(line) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    append_jsonl(path, record)
runner.append_jsonl = append_then_die
model = wb.load_model("tiny-random", progress=False)
runner.evaluate(model, ["angry2peaceful"], "none,prompt", sys.argv[2:], sys.argv[1], max_new_tokens=4, progress=False)
"""


def test_evaluation_killed_mid_line_resumes_to_the_same_records(tiny, tmp_path, caplog):
    import logging
    import signal
    import subprocess
    import sys

    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(out), *PROMPTS], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / ".lock").is_file() and not (out / "results.jsonl").read_text().endswith("\n")
    with caplog.at_level(logging.WARNING, logger="workbench"):
        result = evaluate(tiny, [TASK], "none,prompt", PROMPTS, out, **FAST)
    assert "stale lock" in caplog.text and "torn last line 3" in caplog.text
    lines = [json.loads(x) for x in _lines(out)]
    assert len(lines) == 4 and len(set(_keys(lines))) == 4 and len(result.records) == 4
    fresh = evaluate(tiny, [TASK], "none,prompt", PROMPTS, tmp_path / "fresh", **FAST)
    assert sorted((r["method"], r["prompt"], r["response_ids"]) for r in lines) == \
        sorted((r["method"], r["prompt"], r["response_ids"]) for r in fresh.records)
