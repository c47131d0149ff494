"""The ``model:DIR`` method: another model folder answers, the base judges (for DPO-trained models)."""

import json

import pytest

from workbench.errors import InputError
from workbench.evaluation.methods import Decoding, OtherModel, build_methods
from workbench.evaluation.runner import evaluate
from workbench.model.loading import load_hf_model
from workbench.selfcontrol.tasks import get_task

TASK = get_task("angry2peaceful")


@pytest.fixture(scope="module")
def copy_of_tiny(tmp_path_factory):
    """The tiny model's own weights as a plain folder, under a per-task sub-folder: it must answer as the base does."""
    root = tmp_path_factory.mktemp("models")
    plain = load_hf_model("tiny-random", dtype="float32", progress=False)
    plain.model.save_pretrained(root / TASK.id)
    plain.tokenizer.save_pretrained(root / TASK.id)
    return root


@pytest.fixture(scope="module")
def changed_tiny(tmp_path_factory):
    """The tiny model with other weights (same tokenizer): its answers are its own, not the base's."""
    import torch

    folder = tmp_path_factory.mktemp("changed")
    plain = load_hf_model("tiny-random", dtype="float32", progress=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in plain.model.parameters():
            p.add_(0.5 * torch.randn_like(p) * p.std())
    plain.model.save_pretrained(folder)
    plain.tokenizer.save_pretrained(folder)
    return folder


def test_a_copy_of_the_base_answers_and_is_judged_exactly_as_the_base(tiny, copy_of_tiny, tmp_path):
    method = f"model:{copy_of_tiny}"
    result = evaluate(tiny, [TASK.id], ["none", method], TASK.split("test")[:2], tmp_path / "ev",
                      max_new_tokens=5, progress=False)
    by = {(r["method"], r["prompt"]): r for r in result.records}
    for prompt in TASK.split("test")[:2]:
        plain, other = by["none", prompt], by[method, prompt]
        assert other["response_ids"] == plain["response_ids"]
        assert other["suffix_score"] == pytest.approx(plain["suffix_score"]) and other["nll"] == pytest.approx(plain["nll"])
        assert other["info"]["model"] == str(copy_of_tiny / TASK.id)
    config = json.loads((tmp_path / "ev" / "config.json").read_text())
    assert config["method_settings"][method] == {"folder": str(copy_of_tiny)}
    assert [m.name for m in build_methods(config["methods"])] == ["none", method]  # a rerun from the config rebuilds it


def test_the_other_model_writes_the_answer_and_the_base_judges_it(tiny, changed_tiny, tmp_path):
    import workbench as wb
    from workbench.evaluation.runner import judge_response

    prompts = TASK.split("test")[:2]
    result = evaluate(tiny, [TASK.id], ["none", f"model:{changed_tiny}"], prompts, tmp_path / "ev",
                      max_new_tokens=5, progress=False)
    other = wb.load_model(str(changed_tiny), progress=False)
    rows = [r for r in result.records if r["method"] != "none"]
    assert [r["response_ids"] for r in rows] == [
        list(other.generate([other.chat_ids(p)], max_new_tokens=5).tokens[0]) for p in prompts]
    assert rows[0]["response_ids"] != next(r for r in result.records if r["method"] == "none")["response_ids"]
    judged = judge_response(tiny, TASK, tiny.chat_ids(prompts[0]), rows[0]["response_ids"], TASK.compile(tiny))
    assert rows[0]["suffix_score"] == pytest.approx(judged["suffix_score"])  # by the base's judge


def test_missing_or_incompatible_models_are_refused(tiny, family_folder, tmp_path):
    with pytest.raises(InputError, match="no model for task"):
        OtherModel(tmp_path).prepare(tiny, TASK, Decoding(max_new_tokens=2))
    other = family_folder("qwen2")
    with pytest.raises(InputError, match="other token ids"):
        OtherModel(other).prepare(tiny, TASK, Decoding(max_new_tokens=2), held_out=TASK.split("test")[:1])
    with pytest.raises(InputError, match="model:DIR"):
        build_methods("none,model:")
