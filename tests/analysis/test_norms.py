"""Norm patterns: exact shift values, the zero last-layer gradient, the cache, plots."""

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from workbench.analysis import control_cache as cc
from workbench.analysis.norms import (
    NormPattern,
    analyze_norms,
    norm_heatmap,
    residuals_at_last_token,
    shift_scores,
)
from workbench.selfcontrol.control import Control
from workbench.selfcontrol.search import SelfControlConfig

CONFIG = SelfControlConfig(max_new_tokens=6, iterations=2, n_steps=2, initial_step=-0.05, progress=False)
PROMPTS = ["Someone insulted your work in front of everyone. How do you respond?", "A driver cut you off. What do you do?"]  # noqa: E501


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "shared-controls"  # shared with the other analysis tests


@pytest.fixture(scope="module")
def pattern(tiny, root):
    return analyze_norms("angry2peaceful", model=tiny, prompts=PROMPTS, config=CONFIG, cache_root=root, progress=False)


def test_pattern_shapes_and_invariants(tiny, pattern):
    assert pattern.layers == list(range(tiny.n_layers))
    for name, values in pattern.measures.items():
        assert values.shape == (2, tiny.n_layers), name
        assert np.isfinite(values).all(), name
    # the last block's gradient at prompt positions is exactly zero (the loss reads the last position only)
    assert (pattern.measures["grad"][:, -1] == 0).all()
    assert (pattern.measures["grad"][:, :-1] > 0).all()
    # at layer 0 nothing upstream was shifted: the local and cumulative shifts coincide
    np.testing.assert_allclose(pattern.measures["shift"][:, 0], pattern.measures["cumulative"][:, 0], atol=1e-5)
    assert pattern.position_pattern(4).shape == (tiny.n_layers, 4)
    np.testing.assert_allclose(pattern.mean("grad"), pattern.measures["grad"].mean(0))


def test_sensitivity_is_last_token_gradient_times_clean_residual_norm(tiny, pattern):
    """Checked against the HF twin's hidden states (block outputs; HF's last one is after the final norm)."""
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            hidden = tiny.decoder(torch.tensor([tiny.chat_ids(prompt)]), output_hidden_states=True).hidden_states
        resid = torch.stack([h[0, -1].norm() for h in hidden[1:-1]]).numpy()
        expected = pattern.position_grad_norms[i][:-1, -1] * resid
        np.testing.assert_allclose(pattern.measures["sensitivity"][i, :-1], expected, rtol=1e-4, atol=1e-8)


def test_second_call_uses_the_cache_and_returns_identical_numbers(tiny, root, pattern):
    computed = cc.stats["computed"]
    again = analyze_norms("angry2peaceful", model=tiny, prompts=PROMPTS, config=CONFIG, cache_root=root, progress=False)
    assert cc.stats["computed"] == computed  # no search ran
    assert all(again.from_cache)
    for name in pattern.measures:
        np.testing.assert_array_equal(again.measures[name], pattern.measures[name])
    assert again.final_scores == pattern.final_scores


def test_shift_of_a_known_control_is_exact(tiny):
    """Adding half of the clean residual at layer 0 multiplies its norm by 1.5: shift log(1.5)."""
    ids = tiny.chat_ids("Tell me about rivers.")
    names = tiny.hook_names()
    with torch.no_grad():
        _, cache = tiny.bridge.run_with_cache(tiny.as_tensor(ids), names_filter=lambda n: n == names[0])
    delta = 0.5 * cache[names[0]][0].float()
    control = Control({names[0]: delta, **{n: torch.zeros_like(delta) for n in names[1:]}}, tiny.model_id)
    local, cumulative = shift_scores(tiny, ids, control)
    assert local[0].item() == pytest.approx(np.log(1.5), abs=1e-5)
    assert cumulative[0].item() == pytest.approx(np.log(1.5), abs=1e-5)
    assert local[1:].abs().max().item() < 1e-6  # zero deltas elsewhere: no local shift
    clean = residuals_at_last_token(tiny, ids, names)
    assert torch.allclose(clean[0], cache[names[0]][0, -1].float())


def _synthetic(task: str, peak: int, n_layers: int = 6) -> NormPattern:
    values = np.exp(-((np.arange(n_layers) - peak) ** 2))[None].repeat(2, 0)
    return NormPattern("m", task, list(range(n_layers)), ["a", "b"], {m: values for m in ("grad", "sensitivity", "shift")},
                       [values[0][:, None]] * 2, [0.4, 0.4], [0.5, 0.5])


def test_heatmap_orders_tasks_by_mean_layer():
    patterns = [_synthetic("late", 5), _synthetic("early", 0), _synthetic("middle", 3)]
    assert patterns[1].mean_layer("grad") < patterns[2].mean_layer("grad") < patterns[0].mean_layer("grad")
    fig = norm_heatmap(patterns, "grad")
    ax = fig.axes[0]
    assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == ["early", "middle", "late"]
    image = ax.images[0].get_array()
    assert image.shape == (6, 3) and np.nanmax(image) == pytest.approx(1.0)
    assert np.allclose(np.nanmax(image, axis=0), 1.0)  # each task normalised to its own maximum
    assert ax.get_ylabel() == "layer" and len(fig.axes) == 2  # a colour bar
    plt.close(fig)
    fig = norm_heatmap(patterns, ["grad", "shift"])
    assert len(fig.axes) == 3  # two panels and one colour bar
    plt.close(fig)


def test_plot_and_dict(pattern):
    fig = pattern.plot()
    assert len(fig.axes) == 6  # four panels, the cumulative shift's twin axis and a colour bar
    assert "angry2peaceful" in fig._suptitle.get_text() and "tiny-random" in fig._suptitle.get_text()
    plt.close(fig)
    data = json.loads(json.dumps(pattern.to_dict()))
    assert set(data["measures"]) == {"grad", "sensitivity", "shift", "cumulative"}
    assert len(pattern.rows()) == len(pattern.layers)


def test_no_prompts_is_an_input_error(tiny):
    from workbench.errors import InputError

    with pytest.raises(InputError):
        analyze_norms("angry2peaceful", model=tiny, prompts=[], progress=False)
    with pytest.raises(InputError):
        _synthetic("x", 1).mean("nope")


@pytest.mark.embedded
def test_gradient_norms_fall_with_depth_on_the_embedded_model(embedded, tmp_path):
    """Measured on 15 prompts of the 5 emotion tasks: layers 0-4 have 15-24x the gradient norm of layers 20-27."""
    config = SelfControlConfig(iterations=1, n_steps=1, max_new_tokens=8, progress=False)
    p = analyze_norms("angry2peaceful", model=embedded, n_prompts=1, config=config, cache_root=tmp_path, progress=False)
    g = p.measures["grad"][0]
    assert g[:5].mean() > 8 * g[20:28].mean()
    assert g[-1] == 0 and (g[:-1] > 0).all()
    assert np.isfinite(p.measures["sensitivity"]).all() and (p.measures["sensitivity"][0, :-1] > 0).all()
