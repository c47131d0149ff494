import json

import pytest
import torch

import workbench as wb
from workbench.selfcontrol.search import SelfControlConfig, self_control, self_control_many
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


def test_branches_keep_the_best_scoring_fluent_branch(tiny):
    """Each candidate keeps, of its first-token branches, the best-scoring one that passes the fluency guard."""
    from workbench.selfcontrol.search import fluency_problem
    from workbench.selfcontrol.suffix import score_responses

    task, prompt = CASES[0]
    cfg = SelfControlConfig(**{**TINY, "iterations": 1, "branches": 3})
    result = self_control(tiny, prompt, task, cfg)
    assert result.iterations_accepted == 1
    it = result.iterations[0]
    kept = next(c for c in it.candidates if c.status == "accepted")
    # regenerate the accepted candidate's branches under its control and score them on the clean model
    with it.control.applied(tiny):
        gen = tiny.generate([result.prompt_ids], max_new_tokens=cfg.max_new_tokens, branches=3)
    assert len({tuple(t) for t in gen.tokens}) == 3  # the branches differ (different first tokens)
    scored = score_responses(tiny, [result.prompt_ids] * 3, gen.tokens, task)
    order = sorted(range(3), key=lambda b: -float(scored.scores[b]))
    assert kept.response_ids == gen.tokens[order[0]]  # guard off: the best-scoring branch
    assert kept.branch == order[0] and kept.score == pytest.approx(float(scored.scores[order[0]]), abs=1e-4)
    # with the guard on, a branch that fails it is passed over for the best one that passes
    guarded = SelfControlConfig(**{**TINY, "iterations": 1, "branches": 3, "fluency_guard": True})
    for cand in self_control(tiny, prompt, task, guarded).iterations[0].candidates:
        if cand.status in ("accepted", "not better", "better, later step"):
            assert fluency_problem(cand.response_ids, cand.nll, result.original_nll, guarded) is None


def test_fluency_guard_rejects_with_a_reason_and_only_when_on(tiny):
    task, prompt = CASES[0]
    on = self_control(tiny, prompt, task, **{**TINY, "fluency_guard": True, "iterations": 1})
    off = self_control(tiny, prompt, task, **{**TINY, "fluency_guard": False, "iterations": 1})
    rejected = {c.step for c in on.iterations[0].candidates if c.status.split(":")[0] in ("degenerate", "disfluent")}
    assert rejected  # the guard turned some candidate down, with its reason
    assert not any(c.status.split(":")[0] in ("degenerate", "disfluent") for c in off.iterations[0].candidates)
    # the same candidates, unguarded, are judged on their score alone
    same = [c for c in off.iterations[0].candidates if c.step in rejected]
    assert same and all(c.status in ("accepted", "not better", "better, later step") for c in same)
    assert on.score >= on.initial_score


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


MANY = ["What is love?", "Hi", "Tell me a long story about the sea and the ships on it, please."]


def _same_steps(single, many):
    from workbench.selfcontrol.search import compare_searches

    counts = [compare_searches(s, m) for s, m in zip(single, many, strict=True)]
    assert all(c["different"] == 0 for c in counts), counts
    return counts


def test_many_prompts_accept_the_same_steps_as_one_at_a_time(tiny_any):
    """Batched across prompts of different lengths (batch 2 of 3: the third joins mid-run): the same accepted steps,
    answers and scores as one prompt at a time."""
    task = CASES[0][0]
    single = [self_control(tiny_any, p, task, **TINY) for p in MANY]
    many = self_control_many(tiny_any, MANY, task, batch_size=2, **TINY)
    counts = _same_steps(single, many)
    assert sum(c["tie"] for c in counts) == 0  # no near-ties on these prompts: the equality below is exact
    assert sum(r.iterations_accepted for r in many) >= 2
    for s, m in zip(single, many, strict=True):
        assert m.prompt == s.prompt and m.prompt_ids == s.prompt_ids
        assert m.original_ids == s.original_ids and m.response_ids == s.response_ids
        assert m.score == pytest.approx(s.score, abs=1e-4) and m.initial_score == pytest.approx(s.initial_score, abs=1e-4)
        assert len(m.iterations) == len(s.iterations)
        for a, b in zip(m.iterations, s.iterations, strict=True):
            assert [c.response_ids for c in a.candidates] == [c.response_ids for c in b.candidates]
        for name in s.control.hook_names:
            torch.testing.assert_close(m.control.deltas[name], s.control.deltas[name], atol=1e-4, rtol=1e-3)


def test_many_prompts_are_deterministic_whatever_the_batch_size_including_sampling(tiny):
    task = CASES[1][0]
    runs = [self_control_many(tiny, MANY, task, batch_size=b, do_sample=True, seed=5, **TINY) for b in (1, 3)]
    for other in runs[1:]:
        assert [_trajectory(r) for r in other] == [_trajectory(r) for r in runs[0]]
    assert self_control(tiny, MANY[2], task, do_sample=True, seed=5, **TINY).response_ids == runs[0][2].response_ids


def test_out_of_memory_halves_the_batch_and_continues(tiny, monkeypatch):
    from workbench.selfcontrol import search

    task = CASES[0][0]
    expected = self_control_many(tiny, MANY, task, batch_size=3, **TINY)
    real, sizes = search._round_unguarded, []

    def flaky(model, cfg, steps, suffixes, names, active):
        sizes.append(len(active))
        if len(active) > 1:  # the device "runs out" until the batch is small enough
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(model, cfg, steps, suffixes, names, active)

    monkeypatch.setattr(search, "_round_unguarded", flaky)
    with pytest.warns(UserWarning, match="continuing with 1"):
        got = self_control_many(tiny, MANY, task, batch_size=3, **TINY)
    assert sizes[0] == 3 and max(sizes[1:]) == 1
    assert [_trajectory(r) for r in got] == [_trajectory(r) for r in expected]
    monkeypatch.setattr(search, "_round_unguarded", lambda *a: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("x")))
    with pytest.raises(torch.cuda.OutOfMemoryError):  # a batch of one that does not fit is the user's to see
        self_control_many(tiny, MANY[:1], task, batch_size=4, **TINY)


def test_many_refuses_bad_input(tiny):
    with pytest.raises(wb.InputError, match="list of prompts"):
        self_control_many(tiny, "one prompt", CASES[0][0], **TINY)
    with pytest.raises(wb.InputError, match="batch_size"):
        self_control_many(tiny, MANY, CASES[0][0], batch_size=0, **TINY)
    assert self_control_many(tiny, [], CASES[0][0], **TINY) == []


@pytest.mark.embedded
def test_embedded_many_prompts_accept_the_same_steps(embedded):
    """Three train prompts of angry2peaceful: batched accepts the same step as one prompt at a time (ties count either way)."""
    task = get_task("angry2peaceful")
    prompts = task.split("train")[:3]
    single = [self_control(embedded, p, task, progress=False) for p in prompts]
    many = self_control_many(embedded, prompts, task, batch_size=3, progress=False)
    counts = _same_steps(single, many)
    print("same/tie per prompt:", counts)
    for s, m in zip(single, many, strict=True):
        assert m.gain == pytest.approx(s.gain, abs=2e-3) or any(c["tie"] for c in counts)


def test_default_batch_on_cpu_is_the_measured_best(tiny):
    from workbench.selfcontrol.search import CPU_BATCH_PROMPTS, default_batch_prompts

    assert tiny.device.type == "cpu" and default_batch_prompts(tiny) == CPU_BATCH_PROMPTS >= 1
