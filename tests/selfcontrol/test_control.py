import pytest
import torch

import workbench as wb
from workbench.selfcontrol.control import Control
from workbench.selfcontrol.suffix import suffix_gradients
from workbench.selfcontrol.tasks import Task


def _control(model, prompt, size=30.0, seed=0):
    """A random control of norm ``size`` per hook and position."""
    g = torch.Generator().manual_seed(seed)
    deltas = {n: torch.randn(len(prompt), model.d_model, generator=g) for n in model.hook_names()}
    return Control({n: d / d.norm(dim=-1, keepdim=True) * size for n, d in deltas.items()}, model.model_id)


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
        _, clean = tiny.bridge.run_with_cache(ids, names_filter=[name])
        with control.applied(tiny):
            _, steered = tiny.bridge.run_with_cache(ids, names_filter=[name])
    # the hook at layer 0 adds exactly the delta at prompt positions; what is cached at this hook is its output
    diff = steered[name][0] - clean[name][0]
    torch.testing.assert_close(diff[: len(prompt)], control.deltas[name], atol=1e-5, rtol=1e-5)


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
