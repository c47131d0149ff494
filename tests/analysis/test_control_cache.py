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


def test_damaged_entry_is_recomputed(tiny, tmp_path):
    from workbench.selfcontrol.tasks import get_task

    cheap = cc.resolve_config(CONFIG, iterations=1, n_steps=1, max_new_tokens=3)
    folder = tmp_path / cc.cache_key(tiny, tiny.chat_ids(PROMPT), get_task("angry2peaceful"), cheap)
    folder.mkdir()
    (folder / cc.RESULT).write_text("{not json")
    computed = cc.stats["computed"]
    record = cc.cached_self_control(tiny, PROMPT, "angry2peaceful", cheap, root=tmp_path)
    assert cc.stats["computed"] == computed + 1 and not record.from_cache
    assert json.loads((folder / cc.RESULT).read_text())["final_score"] == record.score
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind
    assert cc.clear_cache(tmp_path) == 1 and not any(tmp_path.iterdir())


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
