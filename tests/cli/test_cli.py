import json
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True, timeout=600)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for name in ("info", "chat", "control", "demo"):
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


def test_control_json_on_tiny_model(tmp_path):
    out = run("control", "--model", "tiny-random", "--task", "angry2peaceful", "--prompt", "Hi", "--iterations", "1",
              "--n-steps", "2", "--max-new-tokens", "4", "--json", "--save", str(tmp_path / "ctl"))
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    for key in ("task", "prompt", "original_response", "controlled_response", "initial_score", "final_score",
                "iterations_accepted", "seconds"):
        assert key in data
    assert data["final_score"] >= data["initial_score"]
    assert (tmp_path / "ctl" / "config.json").is_file()


def test_control_with_unknown_task_is_a_clear_error():
    out = run("control", "--model", "tiny-random", "--task", "nope", "--prompt", "Hi", "--json")
    assert out.returncode == 2 and "unknown task" in out.stderr


def test_info_with_a_device_map(family_folder, tmp_path):
    split = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
             "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    out = run("info", "--model", str(family_folder("llama3")), "--device-map", json.dumps(split), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["device_map"] == split and info["device"] == "cpu"
    bad = run("info", "--model", str(family_folder("llama3")), "--device-map", "{not json")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --device-map")
