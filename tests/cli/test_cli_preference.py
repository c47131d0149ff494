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


SEARCH = ["--model", "tiny-random", "--task", "angry2peaceful", "--iterations", "2", "--n-steps", "3",
          "--initial-step", "-0.1", "--max-new-tokens", "6"]


def test_preference_data_writes_pairs_resumes_and_refuses_other_settings(tmp_path):
    out = tmp_path / "pairs"
    first = run("preference-data", *SEARCH, "--limit", "2", "--out", str(out), "--json")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["mode"] == "selfcontrol" and report["n_prompts"] == 2
    assert report["n_kept"] + sum(report["dropped"].values()) == 2
    log = (out / "prompts.jsonl").read_text()
    assert len(log.splitlines()) == 2 and (out / "pairs.jsonl").is_file()

    human = run("preference-data", *SEARCH, "--limit", "2", "--out", str(out))  # nothing left to do
    assert human.returncode == 0, human.stderr
    assert "2 prompts (selfcontrol)" in human.stdout and "dropped:" in human.stdout
    assert (out / "prompts.jsonl").read_text() == log

    other = run("preference-data", *SEARCH, "--limit", "2", "--out", str(out), "--min-gain", "0.5")
    assert other.returncode == 2 and other.stderr.startswith("error:") and "min_gain" in other.stderr
    assert "Traceback" not in other.stderr


def test_preference_data_baseline_and_bad_input(tmp_path):
    out = run("preference-data", *SEARCH, "--limit", "1", "--out", str(tmp_path / "b"), "--baseline", "prompt", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["mode"] == "prompt"
    row = json.loads((tmp_path / "b" / "prompts.jsonl").read_text())
    assert "iterations_run" not in row
    bad = run("preference-data", *SEARCH, "--split", "nope", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "no split 'nope'" in bad.stderr and not (tmp_path / "x").exists()
    bad = run("preference-data", *SEARCH, "--baseline", "repe", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
