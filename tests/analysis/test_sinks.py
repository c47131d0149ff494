import numpy as np
import pytest
import torch

from workbench import plotting
from workbench.analysis.norms import NormPattern
from workbench.analysis.sinks import plot_control_norms, prompt_sinks, residual_norms
from workbench.selfcontrol.control import Control


def test_residual_norms_and_no_sink_on_the_tiny_model(tiny):
    ids = tiny.chat_ids("Hello there.")
    names = tiny.hook_names()
    norms = residual_norms(tiny, ids, names)
    cache = tiny.capture(tiny.as_tensor(ids), names)
    torch.testing.assert_close(norms[1], cache[names[1]][0].float().norm(dim=-1))
    assert not prompt_sinks(tiny, ids, names).any()


def test_control_norm_plot_draws_the_sink_apart(tiny):
    names = tiny.hook_names()
    deltas = {n: torch.ones(5, tiny.d_model) for n in names}
    for d in deltas.values():
        d[0] *= 100.0
    control = Control(deltas, tiny.model_id)
    sinks = torch.zeros(len(names), 5, dtype=torch.bool)
    sinks[:, 0] = True
    fig, axes = plotting.figure()
    plot_control_norms(axes[0, 0], control, sinks)
    lines = {line.get_label(): line.get_ydata() for line in axes[0, 0].get_lines()}
    np.testing.assert_allclose(lines["control: sink position(s)"], 100.0 * np.sqrt(tiny.d_model), rtol=1e-5)
    np.testing.assert_allclose(lines["control: other positions"], np.sqrt(4 * tiny.d_model), rtol=1e-5)
    fig, axes = plotting.figure()
    plot_control_norms(axes[0, 0], control, torch.zeros_like(sinks))
    assert [line.get_label() for line in axes[0, 0].get_lines()] == ["control: other positions"]


def test_norm_pattern_gradient_split_on_and_off_the_sink():
    grads = [np.array([[3.0, 4.0, 0.0], [6.0, 8.0, 0.0]])]
    masks = [np.array([[True, False, False], [True, False, False]])]
    p = NormPattern("m", "t", [0, 1], ["p"], {"grad": np.zeros((1, 2)), "sensitivity": np.ones((1, 2)),
                                               "shift": np.zeros((1, 2))}, grads, [0.0], [0.0], sink_masks=masks)
    on, off = p.grad_split()
    np.testing.assert_allclose(on, [3.0, 6.0])
    np.testing.assert_allclose(off, [4.0, 8.0])
    fig = p.plot()
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "sink position(s)" in fig.axes[0].get_legend().get_texts()[-1].get_text() or "sink position(s)" in labels


@pytest.mark.embedded
def test_smollm2_first_token_is_a_sink_from_the_middle_layers_on(embedded):
    """SmolLM2-135M: the first template token's residual norm is ~25,000 (16-172x the median) at layers 11-28."""
    ids = embedded.chat_ids("Tell me what you think of rude drivers who cut you off.")
    sinks = prompt_sinks(embedded, ids, embedded.hook_names())
    assert sinks[11:29, 0].all() and not sinks[:, 1:].any()
    assert not sinks[:11].any() and not sinks[29:].any()
