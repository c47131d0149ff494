import warnings

import pytest
import torch

import workbench as wb
from workbench.cli.control import add_search_options
from workbench.errors import InputError
from workbench.selfcontrol import steps
from workbench.selfcontrol.control import Control
from workbench.selfcontrol.search import SelfControlConfig, config_dict, self_control
from workbench.selfcontrol.steps import (
    GEOMETRIES,
    SINK_RATIO,
    dtype_steps,
    gradient_step,
    sink_energy_share,
    sink_mask,
    split_norms,
    step_floor,
)
from workbench.selfcontrol.suffix import suffix_gradients
from workbench.selfcontrol.tasks import Task

TASK = Task(question="Was your answer calm?")
SINK = 2  # the planted massive-activation position


def _planted(model):
    """Gradients on a prompt whose position SINK carries a planted massive activation from layer 0 on."""
    prompt = model.chat_ids("Tell me what you think of rude drivers.")
    response = model.encode("They annoy me a lot.")
    names = model.hook_names()
    deltas = {n: torch.zeros(len(prompt), model.d_model, dtype=model.dtype) for n in names}
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    deltas[names[0]][SINK] = 3000.0 * direction / direction.norm()  # ~60x the typical residual norm of the tiny model
    planted = Control(deltas, model.model_id)
    grads = suffix_gradients(model, prompt, response, TASK, control=planted, clip=None)
    return prompt, grads


def test_no_sink_on_the_clean_tiny_model(tiny):
    prompt = tiny.chat_ids("Tell me what you think of rude drivers.")
    grads = suffix_gradients(tiny, prompt, tiny.encode("They annoy me."), TASK, clip=None)
    assert not sink_mask(grads.resid_norms).any()


def test_planted_high_norm_position_is_detected_at_every_layer(tiny):
    prompt, grads = _planted(tiny)
    mask = sink_mask(grads.resid_norms)
    assert mask.shape == (tiny.n_layers, len(prompt))
    assert mask[:, SINK].all()  # the residual stream carries it through every later block
    mask[:, SINK] = False
    assert not mask.any()  # and nothing else is flagged
    assert not sink_mask(grads.resid_norms, ratio=1e6).any()
    # the ratio reaches the step through the search's knob
    high = grads.step(-0.01, "relative", "sink-off", sink_ratio=1e6)
    assert high.norms()[:-1, SINK].min() > 0 and grads.step(-0.01, "relative", "sink-off").norms()[:, SINK].max() == 0
    with pytest.raises(InputError, match="> 1"):
        sink_mask(grads.resid_norms, ratio=1.0)


def test_each_geometry_scales_the_step_as_documented(tiny):
    _, grads = _planted(tiny)
    eta = -0.01
    norms = grads.resid_norms.float()
    median = norms.median(dim=-1).values
    live = grads.norms() > 0  # the last block's gradient is zero at prompt positions
    want = {
        "position": norms,
        "layer-median": median[:, None].expand_as(norms),
        "sink-median": norms.clone(),
        "sink-off": norms.clone(),
    }
    want["sink-median"][:, SINK] = median
    want["sink-off"][:, SINK] = 0.0
    for geometry in GEOMETRIES:
        deltas = gradient_step(grads.grads, grads.resid_norms, eta, "relative", geometry)
        assert list(deltas) == grads.hook_names
        assert all(d.shape == g.shape for d, g in zip(deltas.values(), grads.grads.values(), strict=True))
        got = torch.stack([d.float().norm(dim=-1) for d in deltas.values()])
        torch.testing.assert_close(got[live], abs(eta) * want[geometry][live], rtol=1e-4, atol=1e-6)
        # the direction is the gradient's (downhill for eta < 0) wherever the step is not zero
        for d, g in zip(deltas.values(), grads.grads.values(), strict=True):
            cos = torch.nn.functional.cosine_similarity(d.float(), g.float(), dim=-1)
            moved = d.float().norm(dim=-1) > 0
            assert torch.allclose(cos[moved], torch.full_like(cos[moved], -1.0), atol=1e-4)
    # the suffix module's step is this one
    torch.testing.assert_close(grads.step(eta, "relative", "sink-off").norms(),
                               torch.stack([d.norm(dim=-1) for d in
                                            gradient_step(grads.grads, grads.resid_norms, eta, "relative", "sink-off").values()]))


def test_sink_energy_share_and_split_norms(tiny):
    _, grads = _planted(tiny)
    sinks = sink_mask(grads.resid_norms)
    shares = {g: sink_energy_share(gradient_step(grads.grads, grads.resid_norms, -0.01, "relative", g), sinks)
              for g in GEOMETRIES}
    assert shares["sink-off"] == 0.0
    assert shares["position"] > 0.5 > shares["layer-median"]  # own-norm steps spend most energy on the sink
    assert shares["sink-median"] == pytest.approx(shares["layer-median"], rel=0.5)
    control = grads.step(-0.01, "relative", "position")
    on, off = split_norms(control.norms(), sinks)
    torch.testing.assert_close(on.pow(2) + off.pow(2), control.norms().pow(2).sum(-1), rtol=1e-4, atol=1e-6)
    assert (on[:-1] > off[:-1]).all()


def test_absolute_mode_only_drops_sinks(tiny):
    _, grads = _planted(tiny)
    plain = gradient_step(grads.grads, grads.resid_norms, -0.5, "absolute", "position")
    off = gradient_step(grads.grads, grads.resid_norms, -0.5, "absolute", "sink-off")
    for name, g in grads.grads.items():
        torch.testing.assert_close(plain[name], -0.5 * g)
        assert off[name][SINK].abs().max() == 0
        torch.testing.assert_close(off[name][:SINK], -0.5 * g[:SINK])
    with pytest.raises(InputError, match="relative"):
        gradient_step(grads.grads, grads.resid_norms, -0.5, "absolute", "layer-median")
    with pytest.raises(InputError, match="geometry"):
        gradient_step(grads.grads, grads.resid_norms, -0.5, "relative", "median")


def test_config_knob_is_validated_fingerprinted_and_on_the_cli():
    assert config_dict(SelfControlConfig(step_geometry="sink-off"))["step_geometry"] == "sink-off"
    assert config_dict(SelfControlConfig()) != config_dict(SelfControlConfig(step_geometry="layer-median"))
    with pytest.raises(InputError, match="geometry"):
        SelfControlConfig(step_geometry="sinkless")
    import argparse

    parser = argparse.ArgumentParser()
    add_search_options(parser)
    action = next(a for a in parser._actions if a.dest == "step_geometry")
    assert tuple(action.choices) == GEOMETRIES and action.default == SelfControlConfig().step_geometry
    ratio = next(a for a in parser._actions if a.dest == "sink_ratio")
    assert ratio.default == SelfControlConfig().sink_ratio == SINK_RATIO
    assert config_dict(SelfControlConfig(sink_ratio=20.0))["sink_ratio"] == 20.0
    with pytest.raises(InputError, match="sink_ratio"):
        SelfControlConfig(sink_ratio=1.0)


def test_without_sinks_the_sink_rules_are_the_position_rule_in_a_search(tiny):
    """The tiny model has no massive activations: sink-off and sink-median searches equal the original one."""
    kw = dict(iterations=1, n_steps=2, max_new_tokens=6, initial_step=-0.05, progress=False, fluency_guard=False)
    base = self_control(tiny, "Tell me about rude drivers.", TASK, **kw)
    for geometry in ("sink-off", "sink-median"):
        other = self_control(tiny, "Tell me about rude drivers.", TASK, step_geometry=geometry, **kw)
        torch.testing.assert_close(other.control.norms(), base.control.norms())
    assert base.iterations[0].candidates[0].step == -0.05


# ---- the dtype (issue 11, point 5) -----------------------------------------------------------------------
def test_dtype_floor_moves_the_ladder_and_warns_once(monkeypatch):
    monkeypatch.setattr(steps, "_warned", set())
    ladder = [-0.001, -0.002, -0.004, -0.008]
    assert dtype_steps(ladder, torch.float32) == ladder
    assert dtype_steps(ladder, torch.bfloat16, mode="absolute") == ladder
    assert step_floor(torch.bfloat16) == 2.0**-7
    with pytest.warns(UserWarning, match="below the resolution of torch.bfloat16"):
        moved = dtype_steps(ladder, torch.bfloat16)
    assert moved[0] == pytest.approx(-(2.0**-7)) and all(s < 0 for s in moved)
    assert [b / a for a, b in zip(moved[:-1], moved[1:], strict=True)] == pytest.approx([2.0, 2.0, 2.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dtype_steps(ladder, torch.bfloat16)  # once per dtype: no second warning
        assert dtype_steps([-0.01, -0.02], torch.bfloat16) == [-0.01, -0.02]


def _applied_cosine(model, eta: float) -> float:
    """Cosine between the delta a relative step asks for and the change it makes to the bf16 residual."""
    prompt = model.chat_ids("Tell me what you think of rude drivers.")
    grads = suffix_gradients(model, prompt, model.encode("They annoy me a lot."), TASK, layers=[1], clip=None)
    return steps.applied_cosine(model, grads.step(eta, "relative"), prompt, model.hook_name(1))


def test_bf16_step_at_the_floor_survives_the_addition(monkeypatch):
    monkeypatch.setattr(steps, "_warned", set())
    model = wb.load_model("tiny-random", dtype=torch.bfloat16, progress=False)
    assert model.dtype == torch.bfloat16
    assert _applied_cosine(model, -0.001) < 0.9  # the old default step: mostly rounded away
    with pytest.warns(UserWarning):
        eta = dtype_steps([-0.001], model.dtype)[0]
    assert _applied_cosine(model, eta) >= 0.95
    # the search uses the dtype-aware ladder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = self_control(model, "Hi there.", TASK, iterations=1, n_steps=2, max_new_tokens=4, progress=False)
    assert [c.step for c in result.iterations[0].candidates] == pytest.approx([-(2.0**-7), -(2.0**-6)])
