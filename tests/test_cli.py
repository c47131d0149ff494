import json
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True, timeout=600)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for name in ("info", "chat"):
        assert name in out.stdout


def test_info_json_on_tiny_model():
    out = run("info", "--model", "tiny-random", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["n_layers"] == 3 and info["d_model"] == 64 and info["device"] == "cpu" and info["cache_path"]


def test_bad_model_is_a_clear_error_not_a_traceback():
    out = run("info", "--model", "./missing-folder")
    assert out.returncode == 2
    assert out.stderr.startswith("error:") and "Traceback" not in out.stderr


def test_chat_json_on_tiny_model():
    out = run("chat", "--model", "tiny-random", "--prompt", "hello", "--max-new-tokens", "4", "--json")
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout)) == {"prompt", "response", "seconds"}
