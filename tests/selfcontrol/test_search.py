import json

import pytest

import workbench as wb
from workbench.selfcontrol.search import SelfControlConfig, self_control
from workbench.selfcontrol.tasks import Task, get_task

# On the tiny random model these cases accept candidates at several step sizes (found by search, deterministic).
CASES = [(Task(question="Was your answer calm?", target="No"), "What is love?"),
         (Task(question="Was your answer calm?", target="Yes"), "Hi")]
TINY = dict(fluency_guard=False, initial_step=-0.1, max_new_tokens=8, progress=False, iterations=3)


def _trajectory(result):
    return [(it.accepted_step, [(c.step, c.response_ids, round(c.score, 5)) for c in it.candidates if c.status != "not evaluated"])
            for it in result.iterations]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_batched_candidates_accept_the_same_step_as_one_at_a_time(tiny, case):
    task, prompt = CASES[case]
    batched = self_control(tiny, prompt, task, batch_candidates=True, **TINY)
    sequential = self_control(tiny, prompt, task, batch_candidates=False, **TINY)
    assert batched.iterations_accepted >= 1
    assert [it.accepted_step for it in batched.iterations] == [it.accepted_step for it in sequential.iterations]
    assert batched.response_ids == sequential.response_ids
    assert batched.score == pytest.approx(sequential.score, abs=1e-5)
    # every candidate the sequential search looked at was scored the same in the batch
    for b, s in zip(_trajectory(batched), _trajectory(sequential), strict=True):
        for cand in s[1]:
            match = [c for c in b[1] if c[0] == cand[0]][0]
            assert match[1] == cand[1] and match[2] == pytest.approx(cand[2], abs=1e-4)


def test_global_best_never_below_the_start_and_trajectory_is_complete(tiny):
    task, prompt = CASES[0]
    result = self_control(tiny, prompt, task, **TINY)
    assert result.score >= result.initial_score
    assert result.score == max([result.initial_score] + [it.best_score for it in result.iterations])
    steps = SelfControlConfig(initial_step=-0.1).steps()
    for it in result.iterations:
        assert [c.step for c in it.candidates] == steps
        assert it.grad_norms.shape == (tiny.n_layers, len(result.prompt_ids))
        assert sum(c.status == "accepted" for c in it.candidates) == (it.accepted_step is not None)
    data = result.to_dict(trajectory=True)
    json.dumps(data)
    for key in ("task", "prompt", "original_response", "controlled_response", "initial_score", "final_score",
                "iterations_accepted", "seconds", "trajectory"):
        assert key in data


def test_deterministic_for_a_fixed_seed_including_sampling(tiny):
    task, prompt = CASES[1]
    a = self_control(tiny, prompt, task, do_sample=True, seed=7, **TINY)
    b = self_control(tiny, prompt, task, do_sample=True, seed=7, **TINY)
    assert _trajectory(a) == _trajectory(b) and a.response_ids == b.response_ids


def test_branches_keep_the_best_scoring_branch(tiny):
    task, prompt = CASES[0]
    result = self_control(tiny, prompt, task, branches=3, **{**TINY, "iterations": 1})
    for cand in result.iterations[0].candidates:
        assert 0 <= cand.branch < 3


def test_fluency_guard_rejects_with_a_reason(tiny):
    task, prompt = CASES[0]
    result = self_control(tiny, prompt, task, **{**TINY, "fluency_guard": True, "iterations": 1})
    reasons = {c.status.split(":")[0] for c in result.iterations[0].candidates}
    assert reasons & {"degenerate", "disfluent", "not better"}
    assert result.score >= result.initial_score


def test_exploding_steps_stop_with_a_clear_error(tiny):
    task, prompt = CASES[0]
    with pytest.raises(wb.NumericalError):
        self_control(tiny, prompt, task, step_mode="absolute", initial_step=-1e38, clip=None, step_scale=1e10, **{k: v for k, v in TINY.items() if k != "initial_step"})


def test_unknown_settings_are_refused(tiny):
    with pytest.raises(wb.InputError, match="unknown settings"):
        self_control(tiny, "hi", CASES[0][0], step=3)


@pytest.mark.embedded
def test_embedded_control_raises_the_score_on_anger_prompts(embedded):
    task = get_task("angry2peaceful")
    results = [self_control(embedded, p, task, progress=False) for p in task.split("train")[:3]]
    for r in results:
        assert r.score >= r.initial_score
    assert any(r.score > r.initial_score and r.response_ids != r.original_ids for r in results)


@pytest.mark.parametrize(("settings", "message"), [
    ({"initial_step": 0.01}, "initial_step must be negative"),
    ({"initial_step": 0.0}, "initial_step must be negative"),
    ({"initial_step": float("nan")}, "initial_step must be a finite number"),
    ({"step_scale": -2.0}, "step_scale must be > 0"),
    ({"n_steps": 0}, "n_steps must be an integer >= 1"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ({"branches": 1.5}, "branches must be an integer >= 1"),
])
def test_settings_that_would_run_another_search_are_refused(settings, message):
    """A positive step climbs the loss (an uphill search): refused when the settings are made, not mid-search."""
    with pytest.raises(wb.InputError, match=message):
        SelfControlConfig(**settings)
    assert SelfControlConfig(initial_step=-0.01, step_scale=3).steps()[:2] == pytest.approx([-0.01, -0.03])


def test_a_repeated_layer_is_refused_by_the_search(tiny):
    with pytest.raises(wb.InputError, match="given more than once"):
        self_control(tiny, "Hi", CASES[0][0], layers=(1, 1), **TINY)
