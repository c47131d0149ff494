import pytest
import torch

import workbench as wb
from workbench.selfcontrol.control import Control
from workbench.selfcontrol.suffix import score_responses, suffix_gradients
from workbench.selfcontrol.tasks import Task

TASK = Task(question="Was your answer calm?")


def _control(model, prompt, size=30.0, seed=0):
    """A random control of norm ``size`` per hook and position."""
    g = torch.Generator().manual_seed(seed)
    deltas = {n: torch.randn(len(prompt), model.d_model, generator=g) for n in model.hook_names()}
    return Control({n: d / d.norm(dim=-1, keepdim=True) * size for n, d in deltas.items()}, model.model_id).bind(prompt)


def test_controlled_generation_cached_equals_uncached(tiny_any):
    prompt = tiny_any.chat_ids("Control me")
    control = _control(tiny_any, prompt)
    plain = tiny_any.generate([prompt], max_new_tokens=10, stop_at_eos=False)
    with control.applied(tiny_any):
        cached = tiny_any.generate([prompt], max_new_tokens=10, stop_at_eos=False)
        uncached = tiny_any.generate([prompt], max_new_tokens=10, stop_at_eos=False, use_cache=False)
    assert cached.tokens == uncached.tokens
    assert cached.tokens != plain.tokens


def test_control_applies_only_at_prompt_positions(tiny):
    prompt = tiny.chat_ids("Where does it act?")
    control = _control(tiny, prompt)
    name = tiny.hook_name(0)
    ids = tiny.as_tensor(prompt + tiny.encode(" and after"))
    with torch.no_grad():
        _, clean = tiny.run_with_cache(ids, prompt_lens=[len(prompt)], names_filter=[name])
        with control.applied(tiny):
            _, steered = tiny.run_with_cache(ids, prompt_lens=[len(prompt)], names_filter=[name])
            with pytest.raises(wb.InputError, match="does not declare"):  # a raw bridge forward is refused, not guessed
                tiny.bridge(ids)
    # the hook at layer 0 adds exactly the delta at prompt positions; what is cached at this hook is its output
    diff = steered[name][0] - clean[name][0]
    torch.testing.assert_close(diff[: len(prompt)], control.deltas[name], atol=1e-5, rtol=1e-5)
    # after the prompt nothing changes at layer 0: the block's output there never saw the addition
    assert torch.equal(steered[name][0, len(prompt):], clean[name][0, len(prompt):])


def test_a_control_is_refused_on_another_prompt(tiny):
    """Shorter, longer, or same-length other prompts: refused, never silently a no-op or misplaced."""
    prompt = tiny.chat_ids("Where does it act?")
    control = _control(tiny, prompt)
    other = prompt[:3] + [prompt[3] + 1] + prompt[4:]  # same length, one id differs
    with control.applied(tiny):
        for wrong in (prompt[:-1], prompt + prompt[-1:], other):
            with pytest.raises(wb.InputError, match=f"holds a {len(wrong)}-token prompt .* belongs to a {len(prompt)}-token"):
                tiny.generate([wrong], max_new_tokens=2)
        with pytest.raises(wb.InputError, match="belongs to"):  # the right prompt in a batch with a wrong one
            tiny.generate([prompt, other], max_new_tokens=2)
    unbound = Control(control.deltas, tiny.model_id)  # bound by length only: another length is still refused
    with unbound.applied(tiny), pytest.raises(wb.InputError, match="belongs to"):
        tiny.generate([prompt[:-1]], max_new_tokens=2)


PROMPTS = ("Hi", "Tell me about the sea and the ships on it, please.", "Why?")


def _batch(model):
    prompts = [model.chat_ids(t) for t in PROMPTS]
    assert len({len(p) for p in prompts}) == 3
    return prompts, [_control(model, p, seed=i) for i, p in enumerate(prompts)]


def test_per_row_controls_for_prompts_of_different_lengths_generate_like_single_rows(tiny_any):
    prompts, controls = _batch(tiny_any)
    with Control.stack(controls).applied(tiny_any):
        batched = tiny_any.generate(prompts, max_new_tokens=8, stop_at_eos=False).tokens
        uncached = tiny_any.generate(prompts, max_new_tokens=8, stop_at_eos=False, use_cache=False).tokens
        branched = tiny_any.generate(prompts, max_new_tokens=4, stop_at_eos=False, branches=2).tokens
    single = []
    for p, c in zip(prompts, controls, strict=True):
        with c.applied(tiny_any):
            single.append(tiny_any.generate([p], max_new_tokens=8, stop_at_eos=False).tokens[0])
            assert branched[2 * len(single) - 2: 2 * len(single)] == tiny_any.generate(
                [p], max_new_tokens=4, stop_at_eos=False, branches=2).tokens
    assert batched == single and uncached == single
    plain = tiny_any.generate(prompts, max_new_tokens=8, stop_at_eos=False).tokens
    assert all(a != b for a, b in zip(plain, single, strict=True))  # each control changed its own row


def test_per_row_controls_give_the_single_row_logits_left_and_right_padded(tiny_any):
    from workbench.model.generation import left_pad, positions
    from workbench.model.layout import ForwardLayout

    prompts, controls = _batch(tiny_any)

    def last_logits(rows, control):
        ids, mask = left_pad(rows, tiny_any.pad_token_id, tiny_any.device)
        with torch.no_grad(), control.applied(tiny_any), tiny_any.declared(ForwardLayout.left_padded(rows)):
            return tiny_any.bridge(ids, attention_mask=mask, position_ids=positions(mask))[:, -1]

    batched = last_logits(prompts, Control.stack(controls))
    for i, (p, c) in enumerate(zip(prompts, controls, strict=True)):
        torch.testing.assert_close(batched[i], last_logits([p], c)[0], atol=1e-4, rtol=1e-4)
    # right-padded: scoring under the per-row controls, one forward, equals each row alone
    answer = tiny_any.encode("I would rather stay calm about it.")
    with Control.stack(controls).applied(tiny_any):
        both = score_responses(tiny_any, prompts, [answer] * 3, TASK)
    for i, (p, c) in enumerate(zip(prompts, controls, strict=True)):
        with c.applied(tiny_any):
            one = score_responses(tiny_any, [p], [answer], TASK)
        torch.testing.assert_close(both.scores[i], one.scores[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(both.nll[i], one.nll[0], atol=1e-4, rtol=1e-4)


def test_a_zero_control_row_equals_plain_generation(tiny_any):
    prompts, controls = _batch(tiny_any)
    rows = [Control.zeros(tiny_any, prompts[0]), controls[1], Control.zeros(tiny_any, prompts[2])]
    with Control.stack(rows).applied(tiny_any):
        got = tiny_any.generate(prompts, max_new_tokens=8, stop_at_eos=False).tokens
    plain = [tiny_any.generate([p], max_new_tokens=8, stop_at_eos=False).tokens[0] for p in prompts]
    assert got[0] == plain[0] and got[2] == plain[2] and got[1] != plain[1]


def test_per_row_controls_under_an_applied_prefix(tiny):
    from workbench.prefix.controller import PrefixController

    prompts, controls = _batch(tiny)
    prefix = PrefixController.init(tiny, 2, residual_layers=[0])
    prefix.embeddings.add_(torch.randn(prefix.embeddings.shape, generator=torch.Generator().manual_seed(3)))
    with prefix.applied(tiny):
        with Control.stack(controls).applied(tiny):
            batched = tiny.generate(prompts, max_new_tokens=8, stop_at_eos=False).tokens
            uncached = tiny.generate(prompts, max_new_tokens=8, stop_at_eos=False, use_cache=False).tokens
        single = []
        for p, c in zip(prompts, controls, strict=True):
            with c.applied(tiny):
                single.append(tiny.generate([p], max_new_tokens=8, stop_at_eos=False).tokens[0])
        prefixed = tiny.generate(prompts, max_new_tokens=8, stop_at_eos=False).tokens
    assert batched == single and uncached == single
    assert prefixed != batched and prefixed != tiny.generate(prompts, max_new_tokens=8, stop_at_eos=False).tokens


def test_stacked_controls_generate_like_single_ones(tiny):
    prompt = tiny.chat_ids("Batch of controls")
    controls = [_control(tiny, prompt, seed=s) for s in range(3)]
    with Control.stack(controls).applied(tiny):
        batched = tiny.generate([prompt] * 3, max_new_tokens=6, stop_at_eos=False).tokens
    single = []
    for c in controls:
        with c.applied(tiny):
            single.append(tiny.generate([prompt], max_new_tokens=6, stop_at_eos=False).tokens[0])
    assert batched == single
    # rows may act on different hooks (layer windows): a row lacking a hook gets zeros there
    names = tiny.hook_names()
    windows = [controls[0].restrict(names[:1]), controls[1].restrict(names[1:]), controls[2]]
    stacked = Control.stack(windows)
    assert stacked.hook_names == names
    assert (stacked.deltas[names[0]][1] == 0).all() and (stacked.deltas[names[1]][0] == 0).all()
    with stacked.applied(tiny):
        batched = tiny.generate([prompt] * 3, max_new_tokens=6, stop_at_eos=False).tokens
    single = []
    for c in windows:
        with c.applied(tiny):
            single.append(tiny.generate([prompt], max_new_tokens=6, stop_at_eos=False).tokens[0])
    assert batched == single


def test_arithmetic(tiny):
    prompt = tiny.chat_ids("Compose")
    a, b = _control(tiny, prompt, seed=1), _control(tiny, prompt, seed=2)
    name = a.hook_names[1]
    torch.testing.assert_close((a + b).deltas[name], a.deltas[name] + b.deltas[name])
    torch.testing.assert_close((2 * a).deltas[name], 2 * a.deltas[name])
    assert (a - a).norms().abs().max() == 0
    partial = a.restrict([name])
    assert (partial + b).deltas[a.hook_names[0]].equal(b.deltas[a.hook_names[0]])
    other = Control.zeros(tiny, len(prompt) + 1)
    with pytest.raises(wb.InputError, match="lengths"):
        a + other
    with pytest.raises(wb.InputError, match="different prompts"):
        a + Control.zeros(tiny, prompt[:-1] + [prompt[-1] + 1])
    with pytest.raises(wb.InputError, match="empty hook selection"):
        Control.zeros(tiny, prompt, [])
    with pytest.raises(wb.InputError, match="no delta"):
        a.restrict(["blocks.0.hook_mlp_out"])


def test_save_load_round_trip_and_model_check(tiny, tiny_mha, tmp_path):
    prompt = tiny.chat_ids("Save me")
    control = _control(tiny, prompt)
    control.meta["note"] = "round trip"
    control.save(tmp_path / "c")
    loaded = Control.load(tmp_path / "c", tiny)
    assert loaded.hook_names == control.hook_names and loaded.meta == {"note": "round trip"}
    for n in control.hook_names:
        assert torch.equal(loaded.deltas[n], control.deltas[n])
    with pytest.raises(wb.IncompatibleArtifactError, match="tiny-random-mha"):
        Control.load(tmp_path / "c", tiny_mha)
    with pytest.raises(wb.InputError, match="made for"):
        with control.__class__(control.deltas, "another-model").applied(tiny):
            pass
    with pytest.raises(wb.IncompatibleArtifactError, match="no saved"):
        Control.load(tmp_path / "nothing", tiny)


def test_nan_control_stops_gradient_with_a_clear_error(tiny):
    prompt = tiny.chat_ids("Break me")
    bad = Control.zeros(tiny, len(prompt))
    bad.deltas[bad.hook_names[0]][0, 0] = float("nan")
    with pytest.raises(wb.NumericalError, match="NaN"):
        suffix_gradients(tiny, prompt, tiny.encode("ok"), Task(question="Calm?"), control=bad)
