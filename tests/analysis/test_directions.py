"""Cosines, PCA and gradient directions."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from workbench.analysis import control_cache as cc
from workbench.analysis.directions import (
    cosine,
    cosine_matrix,
    fit_pca,
    gradient_directions,
    plot_consistency,
    plot_direction_pca,
    plot_trajectories,
    steering_direction,
    task_cosines,
    trajectory_pca,
    unit,
)
from workbench.analysis.norms import residuals_at_last_token
from workbench.errors import InputError
from workbench.selfcontrol.search import SelfControlConfig
from workbench.selfcontrol.suffix import suffix_gradients

CONFIG = SelfControlConfig(max_new_tokens=6, iterations=2, n_steps=2, initial_step=-0.05, progress=False)
TASKS = ["angry2peaceful", "happy2sad"]


def test_cosine_of_a_vector_with_itself_and_its_negation():
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    assert cosine(v, v) == pytest.approx(1.0, abs=1e-6)
    assert cosine(v, -v) == pytest.approx(-1.0, abs=1e-6)
    assert cosine(v, 3.0 * v) == pytest.approx(1.0, abs=1e-6)
    assert np.isnan(cosine(v, torch.zeros(64)))
    with pytest.raises(InputError):
        cosine(v, torch.ones(3))


def test_cosine_matrix():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 32, generator=g)
    m = cosine_matrix(a)
    assert torch.allclose(m.diagonal(), torch.ones(4), atol=1e-6)
    assert torch.allclose(m, m.T, atol=1e-6)
    assert torch.allclose(cosine_matrix(a, -a).diagonal(), -torch.ones(4), atol=1e-6)
    assert m[0, 1].item() == pytest.approx(cosine(a[0], a[1]), abs=1e-6)
    with_zero = cosine_matrix(torch.cat([a, torch.zeros(1, 32)]))
    assert torch.isnan(with_zero[-1]).all() and torch.isfinite(with_zero[:4, :4]).all()
    assert torch.allclose(unit(a).norm(dim=-1), torch.ones(4))


def test_pca_of_copies_of_one_direction_puts_all_variance_on_the_first_component():
    g = torch.Generator().manual_seed(2)
    v = unit(torch.randn(48, generator=g))
    scales = torch.tensor([-2.0, -0.5, 0.3, 1.0, 2.5, 4.0])
    pca = fit_pca(scales[:, None] * v[None], n_components=3)
    assert pca.explained_variance_ratio_[0] == pytest.approx(1.0, abs=1e-9)
    assert abs(float(np.dot(pca.components_[0], v.double().numpy()))) == pytest.approx(1.0, abs=1e-6)
    # two independent directions share the variance
    w = unit(torch.randn(48, generator=g))
    mixed = torch.cat([scales[:, None] * v, scales[:, None] * w])
    assert fit_pca(mixed, 2).explained_variance_ratio_[0] < 0.9
    with pytest.raises(InputError):
        fit_pca(v[None])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "shared-controls"  # shared with the other analysis tests


@pytest.fixture(scope="module")
def directions(tiny, root):
    return gradient_directions(tiny, TASKS, n_prompts=2, config=CONFIG, cache_root=root, progress=False)


def test_gradient_directions_are_unit_descent_directions(tiny, directions):
    assert directions.vectors.shape == (4, tiny.n_layers, tiny.d_model)
    assert directions.tasks == ["angry2peaceful"] * 2 + ["happy2sad"] * 2
    norms = directions.vectors.norm(dim=-1)
    assert torch.allclose(norms[:, :-1], torch.ones_like(norms[:, :-1]), atol=1e-5)
    assert (norms[:, -1] == 0).all()  # last block: zero gradient at prompt positions
    # the direction is minus the suffix-loss gradient at the last prompt token
    from workbench.analysis.directions import original_response
    from workbench.selfcontrol.tasks import get_task

    task = get_task("angry2peaceful")
    ids = tiny.chat_ids(task.split("train")[0])
    response = original_response(tiny, ids, task, CONFIG)
    grads = suffix_gradients(tiny, ids, response, task, clip=None)
    for i, g in enumerate(grads.grads.values()):
        if i < tiny.n_layers - 1:
            assert cosine(directions.vectors[0, i], -g[-1]) == pytest.approx(1.0, abs=1e-5)
    consistency = directions.consistency()
    for values in consistency.values():
        finite = values[np.isfinite(values)]
        assert len(finite) == tiny.n_layers - 1 and (np.abs(finite) <= 1 + 1e-6).all()
    m = task_cosines(directions, 0)
    assert m.shape == (2, 2) and torch.allclose(m.diagonal(), torch.ones(2), atol=1e-5)


def test_mean_position_and_bad_position(tiny):
    ids = tiny.chat_ids("Hello there.")
    vec, names, score = steering_direction(tiny, ids, tiny.encode("Hi!"), "angry2peaceful", position="mean")
    assert vec.shape == (tiny.n_layers, tiny.d_model) and 0 < score < 1 and len(names) == tiny.n_layers
    with pytest.raises(InputError):
        steering_direction(tiny, ids, tiny.encode("Hi!"), "angry2peaceful", position="first")


def test_trajectory_pca(tiny, root):
    # a prompt whose search accepts a step on the tiny model (the control-cache tests rely on it too)
    prompt = "Someone insulted your work in front of everyone. How do you respond?"
    record = cc.cached_self_control(tiny, prompt, "angry2peaceful", CONFIG, root=root)
    t = trajectory_pca(tiny, record)
    assert t.coords.shape[0] == len(record.trajectory) + 1
    assert t.scores[0] == record.initial_score and t.scores[-1] == record.score
    assert any(t.accepted), "the test needs an accepted step; raise initial_step"
    assert not np.allclose(t.coords[0], t.coords[-1])  # the control moved
    assert sum(t.explained_variance_ratio) == pytest.approx(1.0, abs=1e-6) or len(t.coords) > 3
    # with at most 3 states two components are exact: the plotted start-to-end distance is the real one
    assert len(t.coords) <= 3
    scale = residuals_at_last_token(tiny, record.prompt_ids, record.hook_names).norm(dim=-1)
    last = torch.stack([record.trajectory[-1].deltas[n][-1].float() for n in record.hook_names])
    assert np.linalg.norm(t.coords[-1] - t.coords[0]) == pytest.approx(float((last / scale[:, None]).norm()), rel=1e-4)
    fig = plot_trajectories([t])
    assert fig.axes[0].get_xlabel().startswith("PC1")
    plt.close(fig)


def test_plots(directions):
    fig = plot_direction_pca(directions)
    assert fig.axes[0].get_xlabel().startswith("PC1") and "layer" in fig.axes[0].get_title()
    plt.close(fig)
    fig = plot_consistency(directions)
    assert fig.axes[0].get_xlabel() == "layer"
    plt.close(fig)
