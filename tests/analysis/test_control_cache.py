"""The control cache: same run read back identically, no second search, keys that separate runs."""

import json

import pytest
import torch

from workbench.analysis import control_cache as cc
from workbench.selfcontrol.control import Control
from workbench.selfcontrol.search import SelfControlConfig

PROMPT = "Someone insulted your work in front of everyone. How do you respond?"
# large relative steps so the random tiny model accepts at least one step
CONFIG = SelfControlConfig(max_new_tokens=6, iterations=2, n_steps=2, initial_step=-0.05, progress=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("controls")


@pytest.fixture(scope="module")
def first(tiny, root):
    before = dict(cc.stats)
    record = cc.cached_self_control(tiny, PROMPT, "angry2peaceful", CONFIG, root=root)
    assert cc.stats["computed"] == before["computed"] + 1
    return record


def test_second_call_reads_the_cache_without_searching(tiny, root, first):
    folder = root / first.key
    mtime = (folder / cc.RESULT).stat().st_mtime_ns
    computed = cc.stats["computed"]
    again = cc.cached_self_control(tiny, PROMPT, "angry2peaceful", CONFIG, root=root)
    assert cc.stats["computed"] == computed  # no search ran
    assert (folder / cc.RESULT).stat().st_mtime_ns == mtime  # nothing rewritten
    assert again.from_cache and not first.from_cache
    assert again.result is None and first.result is not None
    for name in ("score", "initial_score", "original_ids", "response_ids", "response", "accepted_steps",
                 "iteration_scores", "prompt_ids", "hook_names", "prompt"):
        assert getattr(again, name) == getattr(first, name), name
    assert torch.equal(again.raw_grad_norms, first.raw_grad_norms.float())
    assert torch.equal(again.grad_norms, first.grad_norms.float())
    for n in first.control.hook_names:
        assert torch.equal(again.control.deltas[n], first.control.deltas[n])
    assert len(again.trajectory) == len(first.trajectory)
    for a, b in zip(again.trajectory, first.trajectory, strict=True):
        assert all(torch.equal(a.deltas[n], b.deltas[n]) for n in b.hook_names)


def test_record_matches_the_search_result(first):
    result = first.result
    assert first.score == result.score and first.initial_score == result.initial_score
    assert first.raw_grad_norms.shape == (len(result.hook_names), len(result.prompt_ids))
    assert torch.equal(first.raw_grad_norms, result.iterations[0].raw_grad_norms.float())
    assert any(s is not None for s in first.accepted_steps), "the test needs an accepted step; raise initial_step"
    assert first.gain > 0


def test_key_depends_on_what_the_result_depends_on(tiny, first):
    from workbench.selfcontrol.tasks import get_task

    task = get_task("angry2peaceful")
    ids = tiny.chat_ids(PROMPT)
    key = cc.cache_key(tiny, ids, task, CONFIG)
    assert key == first.key
    assert cc.cache_key(tiny, ids, task, cc.resolve_config(CONFIG, progress=True)) == key  # progress is not a setting
    assert cc.cache_key(tiny, ids, task, cc.resolve_config(CONFIG, max_new_tokens=7)) != key
    assert cc.cache_key(tiny, ids[:-1], task, CONFIG) != key
    assert cc.cache_key(tiny, ids, get_task("happy2sad"), CONFIG) != key
    import dataclasses

    assert cc.cache_key(tiny, ids, dataclasses.replace(task, question="Are you calm?"), CONFIG) != key


def test_lookup_never_searches(tiny, root, first):
    computed = cc.stats["computed"]
    assert cc.lookup(tiny, PROMPT, "angry2peaceful", CONFIG, root=root).score == first.score
    assert cc.lookup(tiny, PROMPT, "happy2sad", CONFIG, root=root) is None
    assert cc.stats["computed"] == computed


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["result not JSON", "control tensors truncated", "trajectory tensors truncated"])
def test_damaged_entry_is_recomputed(tiny, root, first, tmp_path, damage):
    import shutil

    folder = tmp_path / first.key
    shutil.copytree(root / first.key, folder)  # a damaged copy of the module's entry
    cheap = CONFIG
    if damage == "result not JSON":
        (folder / cc.RESULT).write_text("{not json")
    elif damage == "control tensors truncated":
        _truncate(folder / "control" / "tensors.safetensors")
    else:
        saved = sorted((folder / "trajectory").glob("*/tensors.safetensors"))
        assert saved, "the test needs an accepted step; raise initial_step"
        _truncate(saved[0])
    computed = cc.stats["computed"]
    record = cc.cached_self_control(tiny, PROMPT, "angry2peaceful", cheap, root=tmp_path)
    assert cc.stats["computed"] == computed + 1 and not record.from_cache
    assert json.loads((folder / cc.RESULT).read_text())["final_score"] == record.score == first.score
    assert cc.lookup(tiny, PROMPT, "angry2peaceful", cheap, root=tmp_path).from_cache  # repaired: loads again
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind
    assert cc.clear_cache(tmp_path) == 1 and not any(tmp_path.iterdir())


def test_key_includes_the_search_version_and_the_weights(tiny, monkeypatch):
    """Issue 11.1: a fix to the search kept serving old controls (the key had no version of the search's behaviour)."""
    from workbench.selfcontrol.tasks import get_task

    task, ids = get_task("angry2peaceful"), tiny.chat_ids(PROMPT)
    key = cc.cache_key(tiny, ids, task, CONFIG)
    monkeypatch.setattr(cc, "SEARCH_VERSION", cc.SEARCH_VERSION + 1)
    assert cc.cache_key(tiny, ids, task, CONFIG) != key
    monkeypatch.undo()
    weight = tiny.decoder.get_input_embeddings().weight
    original = weight[0, 0].item()
    with torch.no_grad():
        weight[0, 0] = original + 1.0  # element 0 is in the fingerprint's sample
        try:
            assert cc.cache_key(tiny, ids, task, CONFIG) != key
        finally:
            weight[0, 0] = original
    assert cc.cache_key(tiny, ids, task, CONFIG) == key


def test_a_record_keeps_the_users_prompt_text_when_called_with_ids(tiny, tmp_path):
    """Issue 11.1: a call with token ids stored the decoded chat template ("system\nYou are a helpful ...")."""
    cheap = cc.resolve_config(CONFIG, iterations=1, n_steps=1, max_new_tokens=3)
    by_ids = cc.cached_self_control(tiny, tiny.chat_ids(PROMPT), "angry2peaceful", cheap, root=tmp_path)
    assert by_ids.prompt == PROMPT
    assert json.loads((tmp_path / by_ids.key / cc.RESULT).read_text())["prompt"] == PROMPT
    by_text = cc.cached_self_control(tiny, PROMPT, "angry2peaceful", cheap, root=tmp_path)
    assert by_text.from_cache and by_text.key == by_ids.key and by_text.prompt == PROMPT
    assert cc.lookup(tiny, tiny.chat_ids(PROMPT), "angry2peaceful", cheap, root=tmp_path).prompt == PROMPT
    many = cc.cached_self_control_many(tiny, [tiny.chat_ids("Why are you late again?")], "angry2peaceful", cheap,
                                       root=tmp_path, progress=False)
    assert [r.prompt for r in many] == ["Why are you late again?"] and not many[0].from_cache
    system = tiny.chat_ids(PROMPT, system="Be brief.")  # not one plain user turn: its text is what it decodes to
    assert cc.user_text(tiny, system) == tiny.decode(system)


def test_control_round_trip_keeps_dtype_and_model(tiny, root, first):
    loaded = Control.load(root / first.key / "control", tiny)
    assert loaded.model_id == tiny.model_id
    assert next(iter(loaded.deltas.values())).dtype == tiny.dtype


def test_unknown_setting_is_refused(tiny, root):
    from workbench.errors import InputError

    with pytest.raises(InputError, match="unknown settings"):
        cc.cached_self_control(tiny, PROMPT, "angry2peaceful", CONFIG, root=root, max_tokens=3)


def test_many_reads_the_cached_prompts_and_searches_the_rest_together(tiny, root, first):
    other = "Tell me about your weekend."
    computed = cc.stats["computed"]
    records = cc.cached_self_control_many(tiny, [PROMPT, other], "angry2peaceful", CONFIG, root=root, batch_size=2)
    assert cc.stats["computed"] == computed + 1  # only the uncached prompt was searched
    assert records[0].from_cache and records[0].response_ids == first.response_ids
    assert not records[1].from_cache and records[1].prompt == other
    alone = cc.cached_self_control(tiny, other, "angry2peaceful", CONFIG, root=root)
    assert alone.from_cache and alone.key == records[1].key and alone.response_ids == records[1].response_ids
