"""Property: every input is either used as written or refused with one clear error, never a traceback.

Random task JSON, prompt files and command lines (hypothesis). Task and prompt
files never need a model; command lines run on ``tiny-random`` with flags that
keep a valid run short, so most examples are refused before a model loads.
``WORKBENCH_FUZZ_EXAMPLES=500`` runs a longer search than the default.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.evaluation.runner import resolve_prompts
from workbench.selfcontrol.tasks import Task, get_task

SCALE = int(os.environ.get("WORKBENCH_FUZZ_EXAMPLES", "0"))
FILES = settings(max_examples=SCALE or 150, deadline=None, database=None)
# no shrinking for command lines: each example may load a model, and the failing one is printed as found
COMMANDS = settings(max_examples=SCALE or 20, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

text = st.text(max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False, allow_infinity=False) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
prompt_lists = st.lists(text, max_size=4)
words = st.text(min_size=1, max_size=12).filter(str.strip)  # what a valid field holds
VALID_TASK = {
    "target": st.sampled_from(["Yes", "No"]),
    "answer_prefix": st.sampled_from(["Answer:", ""]),
    "id": words, "description": text, "instruction": text,
    "paraphrases": st.lists(words, max_size=3),
    "lexicon": st.dictionaries(st.sampled_from(["target", "opposite"]), words, max_size=2),
    "prompts": st.dictionaries(st.sampled_from(["train", "test"]), st.lists(words, min_size=1, max_size=3), max_size=2),
    "contrast_pairs": st.lists(st.fixed_dictionaries({"prompt": words, "target_response": words,
                                                      "opposite_response": words}), max_size=2),
}
JUNK = {  # what a careless file holds instead
    "question": text | json_values, "target": st.sampled_from(["Maybe", "", " Yes"]) | json_values,
    "contrast": st.sampled_from(["No", "Yes", ""]) | json_values, "answer_prefix": st.just("Answer: ") | json_values,
    "paraphrases": text | json_values, "prompts": st.dictionaries(text, prompt_lists | text | json_values, max_size=2),
    "contrast_pairs": st.lists(st.dictionaries(st.sampled_from(["prompt", "target_response", "opposite_response", "x"]),
                                               text | json_values, max_size=3) | json_values, max_size=2),
    "lexicon": json_values, "id": json_values, "description": json_values, "unknown_field": json_values,
}


@st.composite
def task_documents(draw):
    """A valid task with 0-2 fields spoiled, or any JSON value at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    document = draw(st.fixed_dictionaries({"question": words}, optional=VALID_TASK))
    for field in draw(st.lists(st.sampled_from(sorted(JUNK)), max_size=2, unique=True)):
        document[field] = draw(JUNK[field])
    return document


@FILES
@given(document=task_documents())
def test_a_task_file_is_read_as_written_or_refused_naming_the_file(document):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "task.json"
        path.write_text(json.dumps(document))
        try:
            task = get_task(str(path))
        except WorkbenchError as err:
            event("refused")
            assert f"task file {path}" in str(err)
            return
    event("accepted")
    assert isinstance(task, Task) and task.question == document["question"]
    for split, prompts in task.prompts.items():  # every split exactly as listed: no string read per character
        assert list(prompts) == document["prompts"][split] and all(isinstance(p, str) for p in prompts)
    assert list(task.paraphrases) == document.get("paraphrases", [])
    assert [vars(p) for p in task.contrast_pairs] == document.get("contrast_pairs", [])


TASKS = [get_task("angry2peaceful"), get_task("helpful")]
valid_prompts = st.lists(words, min_size=1, max_size=3, unique=True)
prompt_documents = (valid_prompts
                    | st.fixed_dictionaries({"angry2peaceful": valid_prompts, "helpful": valid_prompts},
                                            optional={"other": json_values})
                    | prompt_lists | json_values
                    | st.dictionaries(st.sampled_from(["angry2peaceful", "helpful", "other"]),
                                      prompt_lists | text | json_values, max_size=3))


@FILES
@given(document=prompt_documents)
def test_a_prompts_file_is_read_as_written_or_refused_naming_the_file(document):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prompts.json"
        path.write_text(json.dumps(document))
        try:
            prompts = resolve_prompts(TASKS, str(path))
        except WorkbenchError as err:
            event("refused")
            assert f"prompts file {path}" in str(err) or "duplicates" in str(err)
            return
    event("accepted")
    for task in TASKS:
        assert prompts[task.id] == (document[task.id] if isinstance(document, dict) else document)


# ---- command lines ---------------------------------------------------------------------------
LAYERS = st.sampled_from(["0", "0,2", "0,0", "0,x", "", "all", "7", "-1", "1,2,1", ",", "a"])
SEARCH = {
    "--iterations": st.sampled_from(["0", "1", "-1", "x"]),
    "--initial-step": st.sampled_from(["-0.05", "0.01", "0", "nan", "inf", "x"]),
    "--step-scale": st.sampled_from(["2", "0", "-2", "nan", "x"]),
    "--n-steps": st.sampled_from(["1", "2", "0", "-3", "x"]),
    "--step-mode": st.sampled_from(["relative", "absolute", "x"]),
    "--threshold": st.sampled_from(["0", "0.1", "-1", "x"]),
    "--branches": st.sampled_from(["1", "2", "0", "x"]),
    "--max-new-tokens": st.sampled_from(["1", "2", "0", "-1", "x"]),
    "--loss": st.sampled_from(["score", "ce", "mse"]),
    "--seed": st.sampled_from(["0", "-1", "x"]),
    "--layers": LAYERS,
    "--point": st.sampled_from(["hook_resid_post", "hook_mlp_out", "nope"]),
    "--sample": None, "--paraphrases": None, "--no-fluency-guard": None,
}
COMMON = {
    "--model": st.sampled_from(["tiny-random", "./no-such-model"]),
    "--device": st.sampled_from(["cpu", "cuda", "x"]),
    "--dtype": st.sampled_from(["float32", "int8", "x"]),
    "--json": None, "--bogus-flag": None,
}


def _flags(paths: dict[str, str]) -> dict[str, dict[str, st.SearchStrategy | None]]:
    """Per command: the flags to draw from (value strategy, or None for a switch)."""
    out_dirs = st.sampled_from([paths["fresh"], paths["file"], paths["deep"]])
    task = st.sampled_from(["angry2peaceful", "nope", "", paths["bad task"], paths["one-prompt task"]])
    prompt = st.sampled_from(["Hi", "", "   ", "héllo"])
    return {
        "info": {},
        "chat": {"--prompt": prompt, "--prefix": st.sampled_from([paths["fresh"], paths["file"]]),
                 "--max-new-tokens": SEARCH["--max-new-tokens"]},
        "control": {"--task": task, "--prompt": prompt, "--save": out_dirs, "--trajectory": None, **SEARCH},
        "demo": {"--task": task, "--prompt": prompt, **SEARCH},
        "synthesize": {"--task": task, "--split": st.sampled_from(["train", "test", "dev"]), "--out": out_dirs,
                       "--limit": st.sampled_from(["1", "0", "-1", "x"]), **SEARCH},
        "train-prefix": {"--data": st.sampled_from([paths["data"], paths["fresh"], paths["file"]]), "--out": out_dirs,
                         "--n-tokens": st.sampled_from(["1", "0", "-2", "x"]), "--layers": LAYERS,
                         "--residual-layers": LAYERS, "--epochs": st.sampled_from(["1", "0", "x"]),
                         "--lr": st.sampled_from(["0.01", "0", "-1", "nan", "x"]),
                         "--batch-size": st.sampled_from(["1", "0", "x"]),
                         "--val-fraction": st.sampled_from(["0", "0.5", "1", "-1", "x"]),
                         "--max-shift-fraction": st.sampled_from(["0.5", "0", "-1", "x"]),
                         "--loss": st.sampled_from(["mse", "relative", "x"]), "--init-text": prompt,
                         "--keep-no-gain": None},
        "evaluate": {"--tasks": st.sampled_from(["angry2peaceful", "nope", "", "angry2peaceful,angry2peaceful", paths["bad task"]]),
                     "--methods": st.sampled_from(["none", "none,prompt", "magic", "", "none,none", "prefix"]),
                     "--prompts": st.sampled_from(["test", "dev", paths["bad prompts"], paths["prompts"]]),
                     "--out": out_dirs, "--limit": st.sampled_from(["1", "0", "x"]),
                     "--prefix": st.sampled_from([paths["fresh"], paths["file"]]),
                     "--repe-layers": LAYERS, "--repe-coefficients": st.sampled_from(["0,0.1", "x", ""]),
                     "--config": st.sampled_from([paths["file"], paths["fresh"], paths["bad task"]]),
                     "--summary-only": None, **SEARCH},
        "judge-check": {"--task": st.sampled_from([paths["pairs task"], "nope", paths["bad task"]]), "--out": out_dirs,
                        "--paraphrases": None},
    }


# Flags that keep a valid run short (``@name``: one of the prepared paths); drawn flags come after
# them, so they can still be overridden.
BASE = {
    "chat": ["--prompt", "Hi", "--max-new-tokens", "2"],
    "control": ["--task", "angry2peaceful", "--prompt", "Hi", "--iterations", "1", "--n-steps", "1", "--max-new-tokens", "2"],
    "demo": ["--iterations", "1", "--n-steps", "1", "--max-new-tokens", "2"],
    "synthesize": ["--task", "angry2peaceful", "--limit", "1", "--iterations", "1", "--n-steps", "1", "--max-new-tokens", "2"],
    "train-prefix": ["--data", "@data", "--epochs", "1"],
    "evaluate": ["--tasks", "angry2peaceful", "--methods", "none", "--limit", "1", "--max-new-tokens", "2"],
    "judge-check": ["--task", "@pairs task"],
}


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny):
    return make_paths(tmp_path_factory.mktemp("fuzz"), tiny)


def make_paths(root: Path, tiny) -> dict[str, str]:
    """Files and folders the command lines point at: good and bad tasks, prompts, synthesised data, a file."""
    from workbench.prefix.synthesis import synthesize
    from workbench.selfcontrol.search import SelfControlConfig

    (root / "a-file").write_text("not a folder")
    (root / "bad-task.json").write_text(json.dumps({"question": "Calm?", "prompts": {"test": "one prompt"}}))
    (root / "one.json").write_text(json.dumps({"question": "Calm?", "prompts": {"train": ["Hi there"]}}))
    (root / "bad-prompts.json").write_text(json.dumps({"angry2peaceful": "Why?"}))
    (root / "prompts.json").write_text(json.dumps(["Why?"]))
    (root / "pairs.json").write_text(json.dumps({"question": "Calm?", "contrast_pairs": [
        {"prompt": "Hi", "target_response": "Hello.", "opposite_response": "Go away."},
        {"prompt": "Bye", "target_response": "Take care.", "opposite_response": "Finally."}]}))
    config = SelfControlConfig(iterations=1, n_steps=1, max_new_tokens=2, progress=False)
    synthesize(tiny, "angry2peaceful", ["hi there", "hello"], root / "data", config=config, progress=False)
    return {"root": str(root), "fresh": str(root / "out"), "file": str(root / "a-file"), "deep": str(root / "a" / "b"),
            "bad task": str(root / "bad-task.json"), "one-prompt task": str(root / "one.json"),
            "bad prompts": str(root / "bad-prompts.json"), "prompts": str(root / "prompts.json"),
            "data": str(root / "data"), "pairs task": str(root / "pairs.json")}


@st.composite
def command_lines(draw, paths):
    flags = _flags(paths)
    name = draw(st.sampled_from(sorted(flags)))
    pool = {**COMMON, **flags[name]}
    argv = [name, "--model", "tiny-random", *(paths[a[1:]] if a.startswith("@") else a for a in BASE.get(name, []))]
    for flag in draw(st.lists(st.sampled_from(sorted(pool)), max_size=4, unique=True)):
        argv += [flag] if pool[flag] is None else [flag, draw(pool[flag])]
    if "--out" in flags[name] and "--out" not in argv:
        argv += ["--out", paths["fresh"]]
    return argv


def test_any_command_line_succeeds_or_exits_2_with_an_error_line(paths):
    @COMMANDS
    @given(argv=command_lines(paths))
    def check(argv):
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(argv)
            except SystemExit as stop:  # argparse refuses a flag by exiting
                code = stop.code
        err = stderr.getvalue()
        event(f"exit {code}")
        assert code in (0, 2), (argv, code, err[-2000:])
        if code == 2:
            assert any(line.startswith("error:") or ": error:" in line for line in err.splitlines()), (argv, err[-2000:])
            assert "Traceback" not in err

    check()
