"""Bad command lines: exit code 2 and one ``error:`` line, before any model loads; never a traceback.

The refusals run with a model that does not exist: the error must be about
the bad input, so the input is checked before the model is loaded.
"""

import json

import pytest

from workbench.cli import main


def cli(capsys, *argv):
    """``python -m workbench *argv`` in this process: (exit code, stdout, stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as stop:  # argparse refuses a flag's value by exiting
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


NO_MODEL = ("--model", "./no-such-model")
CONTROL = ("control", *NO_MODEL, "--task", "angry2peaceful", "--prompt", "Hi")


@pytest.mark.parametrize(("argv", "message"), [
    ((*CONTROL, "--layers", "0,x"), "argument --layers: '0,x' is not a comma-separated list of layer numbers"),
    ((*CONTROL, "--layers", "1,0,1"), "layer(s) [1] named more than once"),
    ((*CONTROL, "--initial-step", "0.01"), "initial_step must be negative"),
    ((*CONTROL, "--initial-step", "0"), "initial_step must be negative"),
    ((*CONTROL, "--n-steps", "0"), "n_steps must be an integer >= 1"),
    (("train-prefix", *NO_MODEL, "--data", "missing", "--out", "x", "--residual-layers", "2,2"),
     "argument --residual-layers: layer(s) [2] named more than once"),
    (("evaluate", *NO_MODEL, "--repe-layers", "a"), "argument --repe-layers"),
    (("evaluate", *NO_MODEL, "--repe-coefficients", "0,big"), "argument --repe-coefficients"),
    (("evaluate", *NO_MODEL, "--limit", "0"), "limit must be >= 1"),
    (("evaluate", *NO_MODEL, "--batch-prompts", "0"), "argument --batch-prompts: must be at least 1, got 0"),
    (("synthesize", *NO_MODEL, "--task", "angry2peaceful", "--out", "x", "--batch-prompts", "two"),
     "argument --batch-prompts: 'two' is not a whole number"),
    (("evaluate", *NO_MODEL, "--methods", "none,magic"), "unknown method 'magic'"),
    (("evaluate", "--summary-only", "--out", "no-such-folder"), "no-such-folder holds no evaluation (no such folder)"),
    (("train-prefix", *NO_MODEL, "--data", "no-such-folder", "--out", "x"), "holds no synthesised data"),
    (("evaluate", "--config", "not-a-config.json"), "not-a-config.json is not an evaluation config"),
    (("synthesize", *NO_MODEL, "--task", "angry2peaceful", "--split", "dev", "--out", "x"), "no split 'dev'"),
])
def test_bad_flags_exit_2_with_one_error_line(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "not-a-config.json").write_text(json.dumps({"question": "Calm?"}))
    code, out, err = cli(capsys, *argv)
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if "error:" in line] == [next(line for line in err.splitlines() if message in line)]
    assert not (tmp_path / "no-such-folder").exists() and not (tmp_path / "x").exists()


def test_demo_runs_on_a_task_with_one_train_prompt(capsys, tmp_path):
    """The demo's default prompt is the task's first train prompt (it read the second and crashed on one)."""
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"question": "Was your answer calm?", "description": "calm",
                                "prompts": {"train": ["Someone shouted at me today."]}}))
    code, out, err = cli(capsys, "demo", "--model", "tiny-random", "--task", str(path), "--iterations", "1",
                         "--n-steps", "1", "--max-new-tokens", "3", "--json")
    assert code == 0, err
    assert "prompt: Someone shouted at me today." in out


def test_an_out_folder_that_is_a_file_is_an_error_line(capsys, tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    code, out, err = cli(capsys, "evaluate", "--model", "tiny-random", "--tasks", "angry2peaceful", "--methods", "none",
                         "--limit", "1", "--max-new-tokens", "2", "--out", str(tmp_path / "taken"))
    assert code == 2 and err.startswith("error: ") and str(tmp_path / "taken") in err and "Traceback" not in err
