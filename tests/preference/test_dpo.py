"""DPO with TRL on the tiny model: it learns the pairs, and the saved folder is an ordinary model folder."""

import json

import pytest
import torch

import workbench as wb
from workbench.errors import InputError
from workbench.model.loading import load_hf_model
from workbench.preference.dpo import REPORT_FILE, read_report, train_dpo
from workbench.preference.pairs import pair, write_pairs

PAIRS = [
    ("Someone insulted your work. How do you respond?", "I take a breath and answer calmly.", "I am furious and I yell at them."),
    ("Your neighbour plays loud music at night.", "I ask them kindly to turn it down.", "I bang on their door and scream."),
    ("A driver cuts you off.", "I let it go and drive on.", "I chase them and honk angrily."),
    ("Your coworker took credit for your idea.", "I talk to them about it calmly.", "I tell everyone they are a liar."),
    ("The waiter brought the wrong dish.", "I politely point out the mistake.", "I shout at the waiter."),
    ("Your friend is late again.", "I wait patiently and smile.", "I storm off in anger."),
]
FAST = dict(epochs=2, batch_size=3, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    write_pairs([pair(p, c, r, chosen_score=0.5, rejected_score=0.4) for p, c, r in PAIRS], folder)
    return folder


def _completion_logps(model, prompt: str, answer: str) -> float:
    """Sum of the answer's token log-probabilities after the chat prompt (the answer's turn closed by the template)."""
    prompt_ids = model.chat_ids(prompt)
    full = model.encode(model.render([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], False))
    assert full[: len(prompt_ids)] == prompt_ids
    ids = model.as_tensor(full)
    with torch.no_grad():
        logps = model.bridge(ids)[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    picked = logps.gather(-1, targets[:, None])[:, 0]
    return float(picked[len(prompt_ids) - 1:].sum())


def _margin(trained, base, beta: float) -> float:
    """Mean DPO implicit reward margin beta * (log-ratio chosen - log-ratio rejected) over the pairs."""
    margins = []
    for prompt, chosen, rejected in PAIRS:
        ratio = [_completion_logps(trained, prompt, a) - _completion_logps(base, prompt, a) for a in (chosen, rejected)]
        margins.append(beta * (ratio[0] - ratio[1]))
    return sum(margins) / len(margins)


def test_full_dpo_lowers_the_loss_raises_the_margin_and_saves_a_loadable_model(data, tiny, tmp_path):
    out = tmp_path / "dpo"
    report = train_dpo(data, out, model="tiny-random", lr=1e-4, **FAST)
    assert report.losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the first step: log 2
    assert report.margins[0] == pytest.approx(0.0, abs=1e-6)
    assert report.losses[-1] < report.losses[0] - 0.05
    assert report.margins[-1] > report.margins[0] + 0.05
    assert report.final["reward_margin"] > 0.1 and report.final["reward_accuracy"] == 1.0

    saved = read_report(out)
    assert saved["settings"]["lr"] == 1e-4 and saved["settings"]["seed"] == 0 and saved["n_pairs"] == len(PAIRS)
    assert [s["loss"] for s in saved["steps"]] == report.losses and saved["base_model"] == "tiny-random"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", REPORT_FILE):
        assert (out / name).is_file(), name

    trained = wb.load_model(str(out), progress=False)
    assert trained.tokenizer.chat_template == tiny.tokenizer.chat_template
    answer = trained.generate([trained.chat_ids(PAIRS[0][0])], max_new_tokens=8)
    assert len(answer.tokens[0]) > 0
    # the saved weights are the trained ones: the margin recomputed from them against the base is TRL's
    assert _margin(trained, tiny, beta=0.1) == pytest.approx(report.final["reward_margin"], rel=0.02, abs=1e-3)


def test_lora_dpo_is_merged_into_plain_weights_and_reproducible(data, tiny, tmp_path):
    report = train_dpo(data, tmp_path / "a", model="tiny-random", lr=2e-3, lora_rank=4, **FAST)
    assert report.losses[-1] < report.losses[0] - 0.02 and report.margins[-1] > report.margins[0] + 0.02
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert "adapter_config.json" not in files and "model.safetensors" in files
    from safetensors.torch import load_file

    merged = load_file(tmp_path / "a" / "model.safetensors")
    assert not any("lora" in k for k in merged)
    base = load_hf_model("tiny-random", progress=False).model.state_dict()
    assert set(merged) <= set(base)
    changed = [k for k in merged if not torch.equal(merged[k], base[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)  # LoRA touched the linear layers only

    trained = wb.load_model(str(tmp_path / "a"), progress=False)
    assert _margin(trained, tiny, beta=0.1) == pytest.approx(report.final["reward_margin"], rel=0.02, abs=1e-3)

    again = train_dpo(data, tmp_path / "b", model="tiny-random", lr=2e-3, lora_rank=4, **FAST)
    assert again.losses == report.losses  # same seed, same run
    assert torch.equal(load_file(tmp_path / "b" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"],
                       merged["model.layers.0.self_attn.q_proj.weight"])


def test_dpo_refuses_bad_data_and_an_occupied_output(tmp_path, data):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps(pair("hi", "hello", "go away"))
    bad.write_text(good + "\n" + json.dumps({"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello",
                                             "rejected": [{"role": "assistant", "content": "no"}]}) + "\n")
    with pytest.raises(InputError, match=r"line 2, field chosen"):
        train_dpo(bad, tmp_path / "out", model="tiny-random", progress=False)
    with pytest.raises(InputError, match="no preference data"):
        train_dpo(tmp_path / "missing", tmp_path / "out", model="tiny-random", progress=False)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        train_dpo(data, occupied, model="tiny-random", progress=False)
    with pytest.raises(InputError, match="unknown DPO settings"):
        train_dpo(data, tmp_path / "out", model="tiny-random", progress=False, learning_rate=1.0)
    assert (occupied / "keep.txt").read_text() == "mine" and not (tmp_path / "out").exists()
