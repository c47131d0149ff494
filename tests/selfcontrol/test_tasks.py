import json

import pytest

import workbench as wb
from workbench.selfcontrol.tasks import Task, get_task, list_tasks, suffix_text

EXPECTED = {"angry2peaceful", "afraid2fearless", "happy2sad", "surprised2calm", "disgusted2satisfied",
            "toxic2nontoxic", "harmless", "helpful", "noemoji", "humor", "privacy", "reasoning"}


def test_all_tasks_ship_with_enough_data():
    assert EXPECTED <= set(list_tasks())
    for name in EXPECTED:
        task = get_task(name)
        assert task.id == name and task.description and task.question
        train, test = task.split("train"), task.split("test")
        assert len(train) >= 24 and len(test) >= 12 and not set(train) & set(test)
        assert len(task.contrast_pairs) >= 16
        assert all(p.target_response != p.opposite_response for p in task.contrast_pairs)


def test_one_line_task_and_json_task(tmp_path):
    task = Task(question="Is your answer polite?", target="Yes")
    assert task.contrast == "No" and task.answer_prefix == "Answer:"
    path = tmp_path / "polite.json"
    path.write_text(json.dumps({"question": "Is your answer polite?", "target": "No", "prompts": {"test": ["hi"]}}))
    loaded = get_task(str(path))
    assert loaded.id == "polite" and loaded.contrast == "Yes" and loaded.split("test") == ["hi"]


def test_bad_tasks_are_refused(tiny):
    with pytest.raises(wb.InputError, match="trailing space|whitespace"):
        Task(question="Polite?", answer_prefix="Answer: ")
    with pytest.raises(wb.InputError, match="contrast"):
        Task(question="Polite?", target="Maybe")
    with pytest.raises(wb.InputError, match="tokens"):
        Task(question="Polite?", target="Absolutely certainly", contrast="No").compile(tiny)
    with pytest.raises(wb.InputError, match="unknown task"):
        get_task("no-such-task")
    with pytest.raises(wb.InputError, match="no split"):
        get_task("angry2peaceful").split("validation")


def test_suffix_ids_continue_the_chat_template(tiny):
    task = get_task("angry2peaceful")
    (suffix,) = task.compile(tiny)
    text = tiny.decode(list(suffix.ids), skip_special_tokens=False)
    assert text.startswith("<|im_end|>") and task.question in text and text.endswith("<|im_start|>assistant\nAnswer:")
    assert text == suffix_text(tiny, task.question, task.answer_prefix)


def test_answer_token_matches_the_prefix(tiny):
    # after "Answer:" the answer carries a leading space; with no prefix it does not
    with_prefix = Task(question="Polite?").compile(tiny)[0]
    no_prefix = Task(question="Polite?", answer_prefix="").compile(tiny)[0]
    tok = tiny.tokenizer.convert_ids_to_tokens
    assert tok(with_prefix.target_id) == "ĠYes" and tok(with_prefix.contrast_id) == "ĠNo"
    assert tok(no_prefix.target_id) == "Yes" and tok(no_prefix.contrast_id) == "No"


@pytest.mark.embedded
def test_embedded_model_prefers_the_chosen_answer_tokens(embedded):
    """The ids we score are the ones the model actually predicts after the suffix."""
    import torch

    task = get_task("angry2peaceful")
    suffix = task.compile(embedded)[0]
    prompt = embedded.chat_ids(task.split("train")[0])
    ids = embedded.as_tensor(prompt + embedded.encode("I will stay calm.") + list(suffix.ids))
    with torch.no_grad():
        logits = embedded.bridge(ids)[0, -1]
    spaced = logits[[suffix.target_id, suffix.contrast_id]].max()
    bare = logits[embedded.encode("Yes") + embedded.encode("No")].max()
    assert spaced > bare + 1.0
    assert logits.topk(5).indices.tolist().count(suffix.target_id) + logits.topk(5).indices.tolist().count(suffix.contrast_id) >= 1


# ---- the task schema: one clear error per bad file, never a misreading --------------------
BAD_TASK_FILES = [
    ({"target": "Yes"}, "field 'question' is required"),
    ({"question": "Calm?", "target": 1}, "field 'target' should be a string, got int 1"),
    (["Calm?"], "should be an object"),
    ({"question": "Calm?", "contrast_pairs": [{"prompt": "Hi"}]},
     "field 'contrast_pairs[0].target_response' is required"),
    ({"question": "Calm?", "prompts": {"test": "one prompt"}}, "field 'prompts.test' should be a list, got str"),
    ({"question": "Calm?", "paraphrases": "Peaceful?"}, "field 'paraphrases' should be a list, got str"),
    ({"question": "Calm?", "prompts": {"train": []}}, "field 'prompts.train' should be non-empty"),
    ({"question": "   "}, "field 'question' should be a non-empty, non-blank string"),
    ({"question": "Calm?", "qestion": "typo"}, "field 'qestion' is not a known field"),
    ({"question": "Calm?", "lexicon": ["trust"]}, "field 'lexicon' should be an object"),
]


@pytest.mark.parametrize(("data", "message"), BAD_TASK_FILES)
def test_a_bad_task_file_names_the_file_and_the_field(tmp_path, data, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(wb.InputError) as caught:
        get_task(str(path))
    assert f"task file {path}" in str(caught.value) and message in str(caught.value)


def test_the_python_constructor_validates_like_the_file():
    """``Task(...)`` refuses what the file refuses; lists become tuples, so valid calls keep working."""
    with pytest.raises(wb.InputError, match="field 'paraphrases' should be a list"):
        Task(question="Calm?", paraphrases="Peaceful?")
    with pytest.raises(wb.InputError, match="field 'question' should be a string"):
        Task(question=1)
    task = Task(question="Calm?", prompts={"test": ["a", "b"]}, contrast_pairs=[{"prompt": "p", "target_response": "t",
                                                                                   "opposite_response": "o"}])
    assert task.split("test") == ["a", "b"] and task.prompts["test"] == ("a", "b")
    assert task.contrast_pairs == (wb.ContrastPair("p", "t", "o"),)


def test_a_new_task_file_is_seen_without_a_restart(tmp_path, monkeypatch):
    import workbench.selfcontrol.tasks as tasks

    monkeypatch.setattr(tasks, "TASKS_DIR", tmp_path)
    before = list_tasks()
    (tmp_path / "polite.json").write_text(json.dumps({"question": "Is your answer polite?"}))
    assert "polite" not in before and "polite" in list_tasks()
    assert get_task("polite").question == "Is your answer polite?"
