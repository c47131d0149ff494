import json
import subprocess
import sys

from workbench.preference.pairs import pair, write_pairs


def run(*args):
    return subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True, timeout=600)


def test_dpo_trains_saves_and_the_result_chats(tmp_path):
    write_pairs([pair("How do you respond to an insult?", "Calmly.", "With a punch."),
                 pair("Your train is late.", "I read a book.", "I kick the ticket machine.")], tmp_path / "data")
    out = run("dpo", "--model", "tiny-random", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "model"),
              "--epochs", "1", "--batch-size", "2", "--lora", "2", "--lr", "1e-3", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["n_pairs"] == 2 and report["settings"]["lora_rank"] == 2 and len(report["steps"]) == 1
    assert report["base_model"] == "tiny-random" and report["final"]["reward_margin"] > 0

    out = run("chat", "--model", str(tmp_path / "model"), "--prompt", "hello", "--max-new-tokens", "4", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["response"]


def test_dpo_bad_data_is_a_clear_error(tmp_path):
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n')
    out = run("dpo", "--model", "tiny-random", "--data", str(tmp_path), "--out", str(tmp_path / "model"))
    assert out.returncode == 2 and out.stderr.startswith("error:") and "line 1, field prompt" in out.stderr
    assert "Traceback" not in out.stderr
